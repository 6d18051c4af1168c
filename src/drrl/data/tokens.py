"""Tokenised corpora cached as memory-mapped arrays, and deterministic batches.

A corpus split is tokenised once per (corpus fingerprint, tokenizer fingerprint) and stored as
``<cache>/tokens/<name>-<split>-<key>.bin`` (uint16 when the vocabulary fits, else uint32) with a
JSON sidecar; later runs memory-map it without tokenising again.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from drrl.data.corpora import Corpus, check_split, get_corpus
from drrl.data.tokenizer import Tokenizer, get_tokenizer
from drrl.errors import DataError
from drrl.utils import atomic_path, cache_dir, sha256_bytes, write_json_atomic

log = logging.getLogger(__name__)


def _cache_paths(corpus: Corpus, split: str, tok: Tokenizer, root: Path | None) -> tuple[Path, Path]:
    key = sha256_bytes(corpus.fingerprint, tok.fingerprint)[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", corpus.name)[-60:]
    base = f"{safe}-{split}-{key}"  # not Path.with_suffix: corpus names may contain dots
    folder = (root or cache_dir()) / "tokens"
    return folder / f"{base}.bin", folder / f"{base}.json"


def load_tokens(
    corpus: Corpus | str, split: str, tokenizer: Tokenizer | str = "gpt2", root: Path | None = None
) -> np.ndarray:
    """Token ids of one split as a read-only memory-mapped 1-D array (tokenised on first use)."""
    check_split(split)
    corpus = get_corpus(corpus) if isinstance(corpus, str) else corpus
    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    bin_path, meta_path = _cache_paths(corpus, split, tok, root)
    if meta_path.is_file() and bin_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            dtype = np.dtype(meta["dtype"])
            if bin_path.stat().st_size == meta["n_tokens"] * dtype.itemsize and meta["n_tokens"] > 0:
                return np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))
        except (ValueError, KeyError, TypeError):
            pass
        log.warning("token cache %s is damaged; tokenising again", bin_path)

    text = corpus.text(split)
    if not text.strip():
        raise DataError(f"corpus {corpus.name} split {split} is empty; point it at a file with text")
    log.info("tokenising %s/%s (%d characters) with %s", corpus.name, split, len(text), tok.name)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    encode_batch = getattr(tok, "encode_batch", None) or (lambda texts: [tok.encode(t) for t in texts])
    # Only GPT-2-style pre-tokenisation is known to encode cut pieces exactly (SentencePiece-style
    # tokenizers add a prefix space at every piece start), so other tokenizers see the whole text.
    pieces = split_for_encoding(text) if getattr(tok, "exact_on_line_cuts", False) else [text]
    n_tokens = 0
    with atomic_path(bin_path) as tmp, open(tmp, "wb") as f:
        for i in range(0, len(pieces), 16):  # bounded memory, tokenizer threads work on 16 pieces at once
            for ids in encode_batch(pieces[i : i + 16]):
                np.asarray(ids, dtype=dtype).tofile(f)
                n_tokens += len(ids)
    meta = {"corpus": corpus.name, "split": split, "tokenizer": tok.name, "n_tokens": n_tokens}
    write_json_atomic(meta_path, {**meta, "dtype": dtype.name, "characters": len(text)})
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))


def split_for_encoding(text: str, target: int = 1 << 20) -> list[str]:
    """Cut ``text`` into pieces of about ``target`` characters that encode to exactly the ids of the
    whole text: only after a single newline between two non-space characters (``"x\nY"``), where
    GPT-2-style pre-tokenisation always emits ``"\n"`` as a token of its own."""
    pieces, start = [], 0
    while len(text) - start > target:
        cut = start + target
        while cut < len(text) - 1 and not (
            text[cut - 1] == "\n" and not text[cut - 2].isspace() and not text[cut].isspace()
        ):
            cut += 1
        if cut >= len(text) - 1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _generator(seed: int, *stream: int) -> torch.Generator:
    # A fresh generator per (seed, step, micro-batch): batches depend only on these numbers, so a
    # resumed run draws exactly the batches an uninterrupted run would.
    state = np.random.SeedSequence([seed, *stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def sample_batch(
    tokens: np.ndarray,
    batch_size: int,
    context: int,
    seed: int,
    step: int,
    micro: int = 0,
    rows: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random contiguous windows: inputs ``x`` and next-token targets ``y``, both (B, context) int64.

    The windows depend only on ``(seed, step, micro)``. ``rows`` reads only that share of the batch (one
    training process's shard): the same windows as ``sample_batch(...)[0][rows]``, without touching the
    others' tokens."""
    if len(tokens) < context + 1:
        raise DataError(
            f"corpus split has {len(tokens)} tokens, fewer than context + 1 = {context + 1}; "
            "use a larger corpus or a shorter context"
        )
    g = _generator(seed, step, micro)
    starts = torch.randint(0, len(tokens) - context, (batch_size,), generator=g).tolist()
    if rows is not None:
        starts = starts[rows]
    win = np.stack([np.asarray(tokens[s : s + context + 1], dtype=np.int64) for s in starts])
    win = torch.from_numpy(win)
    return win[:, :-1], win[:, 1:]


@dataclass(frozen=True)
class Window:
    """Tokens ``[start, end)`` go through the model; targets from absolute position ``score_from`` on are
    scored (each target token of the split is scored exactly once over all windows)."""

    start: int
    end: int
    score_from: int


def eval_windows(n_tokens: int, context: int, stride: int | None = None) -> list[Window]:
    """Non-overlapping windows (``stride=None`` or ``stride == context``), or sliding windows that
    advance by ``stride`` and score only their last ``stride`` targets, giving each scored token
    up to ``context - stride`` tokens of extra history."""
    stride = context if stride is None else stride
    if not 0 < stride <= context:
        raise DataError(f"eval stride must be in 1..context ({context}), got {stride}")
    windows, scored = [], 1  # position 0 has no prediction
    begin = 0
    while scored < n_tokens:
        end = min(begin + context + 1, n_tokens)
        windows.append(Window(begin, end, scored))
        scored = end
        begin += stride
        if begin + 1 >= n_tokens:
            break
    return windows


def spread_windows(tokens: np.ndarray, n: int, length: int, offset_frac: float = 0.0) -> list[torch.Tensor]:
    """``n`` windows of ``length`` tokens evenly spread over ``tokens`` (shifted by a fraction of a stride)."""
    if len(tokens) < length:
        raise DataError(
            f"the corpus split has {len(tokens)} tokens, fewer than one window of {length}; lower --context"
        )
    span = len(tokens) - length
    stride = span / max(n, 1)
    starts = [min(int(i * stride + offset_frac * stride), span) for i in range(n)]
    return [torch.from_numpy(np.asarray(tokens[s : s + length], dtype=np.int64)) for s in starts]
