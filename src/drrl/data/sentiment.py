"""Labelled sentence-classification datasets with fixed train / validation / test splits.

``load_sentences(spec)`` understands:

* ``rt-polarity`` — the 10,605 Rotten Tomatoes sentences with VADER crowd ratings (mean of about
  10 raters on -4..+4) shipped in the **source distribution** of ``vaderSentiment==3.3.2`` (MIT).
  The sdist is fetched once with ``pip download --no-deps --no-binary :all:`` into
  ``$DRRL_CACHE_DIR/downloads/`` and checked against its PyPI sha256. Label 1 if the mean rating is
  > 0, 0 if < 0; the 37 zero ratings are dropped, leaving 10,568 examples. These are the sentences
  of Pang & Lee's rt-polarity / SST, but with VADER's ratings, **not SST labels**. The parsed
  splits are cached as JSON under ``$DRRL_CACHE_DIR/sentences/``, so later loads never open the
  tarball.
* ``tsv:PATH`` — a local UTF-8 file of ``text<TAB>label`` lines (blank lines skipped; a first line
  whose label is not an integer above integer labels, e.g. ``sentence<TAB>label``, is a header).
  Labels that are all non-negative integers are kept as they are; otherwise (words, negative
  numbers) the distinct labels are numbered 0..k-1 in sorted order and kept in ``label_names``.
* ``sst2`` — GLUE SST-2 through ``datasets.load_dataset("nyu-mll/glue", "sst2")`` (online,
  ``pip install 'drrl[hf]'``). GLUE's test labels are hidden, so: train = GLUE train minus a held-out
  5%, validation = that 5%, test = GLUE validation (872 sentences, public labels).
* ``sst2:DIR`` — the same from a local copy in the GLUE TSV layout: ``DIR/train.tsv`` and
  ``DIR/dev.tsv``, each with a ``sentence<TAB>label`` header.

Split procedure (``stratified_split``), the same for every source that has no official split: the
examples are put in a canonical order (rt-polarity: by sentence id; tsv: file order); each one gets
the key ``sha256("<seed>:<position>")`` with seed 0; within each class the examples are ranked by
that key and the first ``round(n_class * 0.1)`` go to test, the next ``round(n_class * 0.1)`` to
validation and the rest to train (sst2: 5% to validation, none to test). Stratifying keeps the
class balance of every split within a rounding error of the whole; hashing instead of a numpy or
torch generator keeps the split identical across library versions. Each split keeps the canonical
order.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drrl.data.corpora import SPLITS, check_split
from drrl.errors import DataError
from drrl.utils import cache_dir, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

SENTENCE_DATASETS = "rt-polarity, tsv:PATH, sst2, sst2:DIR"
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.1, 0.1)  # (validation, test) share of each class
SST2_VALIDATION_FRACTION = 0.05

VADER_REQUIREMENT = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
# sha256 published by PyPI for the sdist (https://pypi.org/simple/vadersentiment/), 2,466,783 bytes.
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_TARBALL = "additional_resources/hutto_ICWSM_2014.tar.gz"
MOVIE_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_CACHE_FORMAT = 1  # bump whenever parsing or splitting changes: old cache files are then ignored

_SST2_HUB_HINT = (
    "sst2 needs the Hugging Face hub (pip install 'drrl[hf]' and go online); offline use rt-polarity or tsv:PATH"
)


@dataclass
class SentenceDataset:
    """Sentences and integer labels for each of ``SPLITS``.

    ``n_classes`` defaults to the largest label + 1; ``label_names[i]`` names class ``i`` where known.
    """

    name: str
    texts: dict[str, list[str]]
    labels: dict[str, list[int]]
    n_classes: int = 0
    label_names: list[str] | None = field(default=None)

    def __post_init__(self):
        if set(self.texts) != set(SPLITS) or set(self.labels) != set(SPLITS):
            raise DataError(f"dataset {self.name} must have exactly the splits {', '.join(SPLITS)}")
        for s in SPLITS:
            if len(self.texts[s]) != len(self.labels[s]):
                raise DataError(
                    f"dataset {self.name} split {s} has {len(self.texts[s])} texts but {len(self.labels[s])} labels"
                )
        all_labels = [y for s in SPLITS for y in self.labels[s]]
        if not self.n_classes:
            self.n_classes = max(all_labels, default=-1) + 1
        if any(not isinstance(y, int) or not 0 <= y < self.n_classes for y in all_labels):
            raise DataError(f"dataset {self.name} has labels outside 0..{self.n_classes - 1}")
        if self.label_names is not None and len(self.label_names) != self.n_classes:
            raise DataError(f"dataset {self.name} names {len(self.label_names)} classes but has {self.n_classes}")

    def split(self, name: str) -> tuple[list[str], list[int]]:
        """``(texts, labels)`` of one split."""
        check_split(name)
        return self.texts[name], self.labels[name]

    def sizes(self) -> dict[str, int]:
        return {s: len(self.labels[s]) for s in SPLITS}

    def class_counts(self, name: str) -> list[int]:
        check_split(name)
        counts = [0] * self.n_classes
        for y in self.labels[name]:
            counts[y] += 1
        return counts


# --------------------------------------------------------------------------- splitting
def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def stratified_split(
    labels: Sequence[int], fractions: tuple[float, float] = SPLIT_FRACTIONS, seed: int = SPLIT_SEED
) -> dict[str, list[int]]:
    """Positions of ``labels`` in each split (see the module docstring); each list is ascending."""
    val_frac, test_frac = fractions
    key = [hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(len(labels))]
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in sorted(set(labels)):
        members = sorted((i for i, y in enumerate(labels) if y == c), key=lambda i: key[i])
        n_test = _round_half_up(len(members) * test_frac)
        n_val = _round_half_up(len(members) * val_frac)
        out["test"] += members[:n_test]
        out["validation"] += members[n_test : n_test + n_val]
        out["train"] += members[n_test + n_val :]
    return {s: sorted(idx) for s, idx in out.items()}


def _from_rows(
    name: str,
    texts: Sequence[str],
    labels: Sequence[int],
    fractions=SPLIT_FRACTIONS,
    n_classes: int = 0,
    label_names: list[str] | None = None,
) -> SentenceDataset:
    parts = stratified_split(labels, fractions)
    return SentenceDataset(
        name,
        {s: [texts[i] for i in idx] for s, idx in parts.items()},
        {s: [labels[i] for i in idx] for s, idx in parts.items()},
        n_classes,
        label_names,
    )


def _check_nonempty(ds: SentenceDataset, hint: str) -> SentenceDataset:
    empty = [s for s in SPLITS if not ds.labels[s]]
    if empty:
        raise DataError(
            f"dataset {ds.name} has {sum(ds.sizes().values())} examples, too few for a non-empty "
            f"{' and '.join(empty)} split; {hint}"
        )
    return ds


# --------------------------------------------------------------------------- rt-polarity (VADER)
def _downloads_dir() -> Path:
    return cache_dir() / "downloads"


def _verify_sdist(path: Path) -> Path:
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        raise DataError(
            f"{path} has sha256 {digest[:12]}..., expected {SDIST_SHA256[:12]}... ({VADER_REQUIREMENT} sdist); "
            "delete the file and load rt-polarity again"
        )
    return path


def _pip_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1][:200]


def _download_sdist(dest: Path) -> None:
    """``pip download`` the sdist into a scratch folder next to ``dest``, verify it, move it onto ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".pip-", dir=dest.parent))
    fix = "go online once (the file is cached), or pass tsv:PATH"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-input"]
    cmd += ["--disable-pip-version-check", "--progress-bar", "off", VADER_REQUIREMENT, "-d", str(scratch)]
    try:
        log.info("downloading the %s sdist from PyPI", VADER_REQUIREMENT)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"cannot download {VADER_REQUIREMENT} sdist ({type(e).__name__}); {fix}") from None
        if proc.returncode != 0:
            raise DataError(f"cannot download {VADER_REQUIREMENT} sdist (pip: {_pip_error(proc.stderr)}); {fix}")
        found = [p for p in scratch.iterdir() if p.name.lower() == SDIST_NAME.lower()]
        if not found:
            raise DataError(
                f"pip download of {VADER_REQUIREMENT} gave no {SDIST_NAME} (got {sorted(p.name for p in scratch.iterdir())}); "
                "check that pip may fetch source distributions (no --only-binary in pip.conf)"
            )
        os.replace(_verify_sdist(found[0]), dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _sdist_path() -> Path:
    """The verified sdist under ``$DRRL_CACHE_DIR/downloads/``, downloaded on first use."""
    path = _downloads_dir() / SDIST_NAME
    if path.is_file():
        return _verify_sdist(path)
    _download_sdist(path)
    return path


def read_vader_movie_file(sdist: str | os.PathLike) -> bytes:
    """Raw bytes of the movie-snippet ground truth inside the sdist's inner tarball."""
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            member = next((m for m in outer.getmembers() if m.name.endswith("/" + INNER_TARBALL)), None)
            if member is None or not member.isfile():
                raise DataError(f"{sdist} has no {INNER_TARBALL}; it is not the {VADER_REQUIREMENT} sdist")
            inner_bytes = outer.extractfile(member).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            try:
                return inner.extractfile(MOVIE_FILE).read()
            except KeyError:
                raise DataError(f"{sdist}: {INNER_TARBALL} has no {MOVIE_FILE}; delete the file and retry") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read {sdist} ({type(e).__name__}: {e}); delete the file and retry") from None


def parse_vader_ratings(raw: bytes) -> list[tuple[int, float, str]]:
    """``(id, mean_rating, sentence)`` rows sorted by id.

    The file in 3.3.2 is UTF-8 (e.g. "clichés"), although the ICWSM data is often described as latin-1;
    bytes that are not valid UTF-8 are read as latin-1.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            if len(parts) != 3 or not parts[2].strip():
                raise ValueError
            rows.append((int(parts[0]), float(parts[1]), parts[2].strip()))
        except ValueError:
            raise DataError(
                f"{MOVIE_FILE} line {lineno} is not 'id<TAB>rating<TAB>sentence'; delete the cached sdist and retry"
            ) from None
    rows.sort(key=lambda r: r[0])
    return rows


def _rt_cache_path() -> Path:
    return cache_dir() / "sentences" / f"rt-polarity-{SDIST_SHA256[:16]}-v{_CACHE_FORMAT}.json"


def _read_cache(path: Path) -> SentenceDataset | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if obj.get("format") != _CACHE_FORMAT or obj.get("sdist_sha256") != SDIST_SHA256:
            return None
        return SentenceDataset(obj["name"], obj["texts"], obj["labels"], obj["n_classes"], obj["label_names"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DataError) as e:
        log.warning("ignoring unreadable sentence cache %s (%s); rebuilding it", path, e)
        return None


def load_rt_polarity() -> SentenceDataset:
    cache = _rt_cache_path()
    if cache.is_file() and (ds := _read_cache(cache)) is not None:
        return ds
    rows = parse_vader_ratings(read_vader_movie_file(_sdist_path()))
    kept = [(text, int(rating > 0)) for _, rating, text in rows if rating != 0]
    ds = _from_rows(
        "rt-polarity", [t for t, _ in kept], [y for _, y in kept], n_classes=2, label_names=["negative", "positive"]
    )
    write_json_atomic(
        cache,
        {
            "format": _CACHE_FORMAT,
            "sdist_sha256": SDIST_SHA256,
            "name": ds.name,
            "n_classes": ds.n_classes,
            "label_names": ds.label_names,
            "texts": ds.texts,
            "labels": ds.labels,
        },
    )
    return ds


# --------------------------------------------------------------------------- local TSV
def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _encode_labels(raw: list[str]) -> tuple[list[int], list[str] | None]:
    if all(_is_int(r) for r in raw):
        ints = [int(r) for r in raw]
        if min(ints) >= 0:
            return ints, None
        names = sorted(set(ints))
        index = {v: i for i, v in enumerate(names)}
        return [index[v] for v in ints], [str(v) for v in names]
    names = sorted(set(raw))
    index = {v: i for i, v in enumerate(names)}
    return [index[v] for v in raw], names


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; pass an existing file")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {path} is not UTF-8 text ({e.reason}); convert it to UTF-8") from None


def load_tsv(path: str) -> SentenceDataset:
    p = Path(path).expanduser()
    content = _read_text(p, "tsv file")
    rows: list[tuple[int, str, str]] = []
    for lineno, line in enumerate(content.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(f"{p} line {lineno} has no tab; write 'text<TAB>label' on every non-blank line")
        text, label = (part.strip() for part in line.rsplit("\t", 1))
        if not text or not label:
            raise DataError(f"{p} line {lineno} has an empty {'text' if not text else 'label'}; fix or remove it")
        rows.append((lineno, text, label))
    # A header such as "sentence<TAB>label" above integer labels is skipped.
    if len(rows) > 1 and not _is_int(rows[0][2]) and all(_is_int(r[2]) for r in rows[1:]):
        rows = rows[1:]
    if not rows:
        raise DataError(f"{p} holds no examples; write one 'text<TAB>label' line per example")
    labels, names = _encode_labels([r[2] for r in rows])
    if len(set(labels)) < 2:
        raise DataError(f"{p} has a single label ({rows[0][2]!r}); a classification file needs at least two")
    ds = _from_rows(f"tsv:{p}", [r[1] for r in rows], labels, label_names=names)
    return _check_nonempty(ds, "add examples (at least ~10 per class)")


# --------------------------------------------------------------------------- SST-2
def _read_glue_tsv(path: Path) -> tuple[list[str], list[int]]:
    lines = [ln.rstrip("\r") for ln in _read_text(path, "GLUE file").split("\n")]
    header = lines[0].split("\t") if lines else []
    if "sentence" not in header or "label" not in header:
        raise DataError(f"{path} does not start with a 'sentence<TAB>label' header (the GLUE SST-2 layout)")
    si, li = header.index("sentence"), header.index("label")
    texts, labels = [], []
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != len(header) or not _is_int(parts[li]) or int(parts[li]) not in (0, 1):
            raise DataError(f"{path} line {lineno} is not '{'<TAB>'.join(header)}' with label 0 or 1; fix the line")
        texts.append(parts[si].strip())
        labels.append(int(parts[li]))
    if not labels:
        raise DataError(f"{path} holds no examples below its header")
    return texts, labels


def _sst2_dataset(name: str, train: tuple[list[str], list[int]], test: tuple[list[str], list[int]]) -> SentenceDataset:
    parts = stratified_split(train[1], (SST2_VALIDATION_FRACTION, 0.0))
    texts = {s: [train[0][i] for i in parts[s]] for s in ("train", "validation")}
    labels = {s: [train[1][i] for i in parts[s]] for s in ("train", "validation")}
    texts["test"], labels["test"] = list(test[0]), list(test[1])
    return SentenceDataset(name, texts, labels, 2, ["negative", "positive"])


def load_sst2(local_dir: str | None = None) -> SentenceDataset:
    if local_dir is not None:
        d = Path(local_dir).expanduser()
        missing = [f for f in ("train.tsv", "dev.tsv") if not (d / f).is_file()]
        if missing:
            raise DataError(f"SST-2 folder {d} lacks {', '.join(missing)} (the GLUE layout: train.tsv, dev.tsv)")
        ds = _sst2_dataset(f"sst2:{d}", _read_glue_tsv(d / "train.tsv"), _read_glue_tsv(d / "dev.tsv"))
        return _check_nonempty(ds, "use the full GLUE SST-2 train.tsv")
    try:
        import datasets
    except ImportError:
        raise DataError(_SST2_HUB_HINT) from None
    try:
        hub = datasets.load_dataset("nyu-mll/glue", "sst2")
        train = ([t.strip() for t in hub["train"]["sentence"]], [int(y) for y in hub["train"]["label"]])
        test = ([t.strip() for t in hub["validation"]["sentence"]], [int(y) for y in hub["validation"]["label"]])
    except Exception as e:  # network errors come in many types (ConnectionError, HfHubHTTPError, ...)
        raise DataError(f"cannot load sst2 ({type(e).__name__}); {_SST2_HUB_HINT}") from None
    return _sst2_dataset("sst2", train, test)


# --------------------------------------------------------------------------- entry point
def load_sentences(spec: str) -> SentenceDataset:
    """Build a labelled sentence dataset from its spec string (see the module docstring)."""
    name, sep, arg = spec.partition(":")
    if spec == "rt-polarity":
        return load_rt_polarity()
    if name == "tsv" and sep:
        if not arg:
            raise DataError("tsv: needs a path, e.g. tsv:data/reviews.tsv")
        return load_tsv(arg)
    if name == "sst2":
        if sep and not arg:
            raise DataError("sst2: needs a folder, e.g. sst2:data/SST-2 (with train.tsv and dev.tsv)")
        return load_sst2(arg or None)
    raise DataError(f"unknown sentence dataset {spec!r}; use one of: {SENTENCE_DATASETS}")
