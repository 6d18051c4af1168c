"""Token cache, random training batches and evaluation windows."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.data import eval_windows, get_corpus, get_tokenizer, load_tokens, sample_batch
from drrl.errors import DataError
from tests.conftest import make_text


class CountingTokenizer:
    """GPT-2 with the same fingerprint (so the same cache key) that counts or forbids ``encode``."""

    def __init__(self, forbid: bool = False):
        self._tok = get_tokenizer("gpt2")
        self.name = self._tok.name
        self.vocab_size = self._tok.vocab_size
        self.eot_id = self._tok.eot_id
        self.fingerprint = self._tok.fingerprint
        self.forbid = forbid
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        if self.forbid:
            raise AssertionError("encode called although the token cache should have been used")
        self.calls += 1
        return self._tok.encode(text)

    def decode(self, ids) -> str:
        return self._tok.decode(ids)


@pytest.fixture
def play(tmp_path) -> Path:
    """A one-file corpus folder; the spec ``text:FOLDER`` has no dot in its name."""
    path = tmp_path / "corpus" / "play.txt"
    path.parent.mkdir()
    path.write_text(make_text(300, seed=7))
    return path


def _spec(play: Path) -> str:
    return f"text:{play.parent}"


def _bins(root: Path) -> list[Path]:
    return sorted((root / "tokens").glob("*.bin"))


# --------------------------------------------------------------------------- load_tokens
def test_load_tokens_matches_encode(text_corpus, tmp_path):
    tokens = load_tokens(text_corpus, "validation", root=tmp_path)
    expected = get_tokenizer("gpt2").encode(get_corpus(text_corpus).text("validation"))
    assert isinstance(tokens, np.memmap)
    assert tokens.dtype == np.uint16
    assert tokens.ndim == 1 and len(tokens) == len(expected) > 100
    np.testing.assert_array_equal(tokens, np.asarray(expected))
    assert not tokens.flags.writeable


def test_load_tokens_uses_drrl_cache_dir(play):
    cache = Path(os.environ["DRRL_CACHE_DIR"])
    before = set(_bins(cache)) if (cache / "tokens").is_dir() else set()
    tokens = load_tokens(_spec(play), "test")
    (new_bin,) = set(_bins(cache)) - before
    assert "-test-" in new_bin.name
    assert Path(tokens.filename) == new_bin
    assert new_bin.with_suffix(".json").is_file()


def test_second_call_reads_cache(play, tmp_path):
    corpus = get_corpus(_spec(play))
    counting = CountingTokenizer()
    first = np.array(load_tokens(corpus, "train", counting, root=tmp_path))
    assert counting.calls == 1
    assert len(_bins(tmp_path)) == 1

    second = load_tokens(get_corpus(_spec(play)), "train", CountingTokenizer(forbid=True), root=tmp_path)
    np.testing.assert_array_equal(second, first)
    assert len(_bins(tmp_path)) == 1


def test_splits_cached_separately(play, tmp_path):
    corpus = get_corpus(_spec(play))
    tok = get_tokenizer("gpt2")
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(load_tokens(corpus, split, root=tmp_path), tok.encode(corpus.text(split)))
    assert len(_bins(tmp_path)) == 3


def test_changed_file_gets_new_cache_entry(play, tmp_path):
    old = np.array(load_tokens(_spec(play), "train", root=tmp_path))
    play.write_text(make_text(350, seed=8))
    counting = CountingTokenizer()
    new = load_tokens(_spec(play), "train", counting, root=tmp_path)
    assert counting.calls == 1
    assert len(_bins(tmp_path)) == 2
    assert len(new) != len(old)
    expected = get_tokenizer("gpt2").encode(get_corpus(_spec(play)).text("train"))
    np.testing.assert_array_equal(new, expected)


def test_damaged_cache_is_rebuilt(play, tmp_path, caplog):
    good = np.array(load_tokens(_spec(play), "validation", root=tmp_path))
    (bin_path,) = _bins(tmp_path)
    size = bin_path.stat().st_size
    with open(bin_path, "r+b") as f:
        f.truncate(size // 2)

    counting = CountingTokenizer()
    with caplog.at_level(logging.WARNING, logger="drrl.data.tokens"):
        rebuilt = load_tokens(_spec(play), "validation", counting, root=tmp_path)
    assert counting.calls == 1
    assert "damaged" in caplog.text
    np.testing.assert_array_equal(rebuilt, good)
    assert bin_path.stat().st_size == size


def test_damaged_sidecar_is_rebuilt(play, tmp_path):
    good = np.array(load_tokens(_spec(play), "test", root=tmp_path))
    (meta_path,) = (tmp_path / "tokens").glob("*.json")
    meta_path.write_text("{not json")
    counting = CountingTokenizer()
    np.testing.assert_array_equal(load_tokens(_spec(play), "test", counting, root=tmp_path), good)
    assert counting.calls == 1


def test_empty_split(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("   \n\n\t\n" * 40)
    with pytest.raises(DataError, match="split train is empty"):
        load_tokens(f"text:{path}", "train", root=tmp_path)
    assert _bins(tmp_path) == []


def test_load_tokens_unknown_split(text_corpus):
    with pytest.raises(DataError, match="unknown split"):
        load_tokens(text_corpus, "dev")


# --------------------------------------------------------------------------- sample_batch
TOKENS = np.arange(1000, 1500, dtype=np.uint16)


def test_sample_batch_shapes_and_shift():
    x, y = sample_batch(TOKENS, batch_size=8, context=16, seed=0, step=3)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    for row_x, row_y in zip(x, y, strict=True):
        start = int(row_x[0]) - 1000
        assert 0 <= start <= len(TOKENS) - 17
        np.testing.assert_array_equal(row_x.numpy(), TOKENS[start : start + 16])
        np.testing.assert_array_equal(row_y.numpy(), TOKENS[start + 1 : start + 17])


def test_sample_batch_from_memmap(text_corpus):
    tokens = load_tokens(text_corpus, "train")
    x, y = sample_batch(tokens, batch_size=4, context=32, seed=1, step=0)
    assert x.shape == (4, 32)
    all_windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens, dtype=np.int64), 33)
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        window = np.concatenate([row_x, row_y[-1:]])
        assert (all_windows == window).all(axis=1).any()


def test_sample_batch_deterministic():
    a = sample_batch(TOKENS, 6, 8, seed=5, step=10, micro=2)
    b = sample_batch(TOKENS, 6, 8, seed=5, step=10, micro=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(123)
    c = sample_batch(TOKENS, 6, 8, seed=5, step=10, micro=2)
    assert torch.equal(a[0], c[0])


@pytest.mark.parametrize("change", [{"step": 11}, {"micro": 3}, {"seed": 6}])
def test_sample_batch_varies(change):
    base = {"seed": 5, "step": 10, "micro": 2}
    a, _ = sample_batch(TOKENS, 6, 8, **base)
    b, _ = sample_batch(TOKENS, 6, 8, **{**base, **change})
    assert not torch.equal(a, b)


def test_sample_batch_exact_length():
    x, y = sample_batch(TOKENS[:17], batch_size=3, context=16, seed=0, step=0)
    assert (x == torch.from_numpy(TOKENS[:16].astype(np.int64))).all()
    assert (y == torch.from_numpy(TOKENS[1:17].astype(np.int64))).all()


def test_sample_batch_too_short():
    with pytest.raises(DataError, match=r"has 16 tokens, fewer than context \+ 1 = 17"):
        sample_batch(TOKENS[:16], batch_size=2, context=16, seed=0, step=0)


# --------------------------------------------------------------------------- eval_windows
@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(2, 2000),
    context=st.integers(1, 64),
    data=st.data(),
)
def test_eval_windows_cover_each_target_once(n, context, data):
    stride = data.draw(st.one_of(st.none(), st.integers(1, context)), label="stride")
    windows = eval_windows(n, context, stride)
    assert windows
    scored = []
    for w in windows:
        assert 0 <= w.start < w.end <= n
        assert w.end - w.start <= context + 1
        assert w.start + 1 <= w.score_from < w.end
        scored.extend(range(w.score_from, w.end))
    assert scored == list(range(1, n))
    if stride is None or stride == context:
        for prev, cur in zip(windows, windows[1:], strict=False):
            assert cur.start == prev.end - 1
            assert cur.score_from == cur.start + 1


def test_eval_windows_sliding_history():
    windows = eval_windows(20, context=8, stride=4)
    assert [(w.start, w.end, w.score_from) for w in windows] == [(0, 9, 1), (4, 13, 9), (8, 17, 13), (12, 20, 17)]


def test_eval_windows_too_short():
    assert eval_windows(1, 8) == []


@pytest.mark.parametrize("stride", [-1, 9, 100])
def test_eval_windows_bad_stride(stride):
    with pytest.raises(DataError, match=r"stride must be in 1\.\.context \(8\)"):
        eval_windows(100, context=8, stride=stride)


def test_eval_windows_zero_stride_rejected():
    with pytest.raises(DataError, match="stride must be in 1..context"):
        eval_windows(100, context=8, stride=0)


# --------------------------------------------------------------------------- file corpora (names with dots)
@pytest.fixture
def play_file(tmp_path) -> Path:
    path = tmp_path / "play.txt"
    path.write_text(make_text(300, seed=7))
    return path


def test_file_corpus_splits_cached_separately(play_file, tmp_path):
    corpus = get_corpus(f"text:{play_file}")
    load_tokens(corpus, "train", root=tmp_path)
    validation = load_tokens(corpus, "validation", root=tmp_path)
    np.testing.assert_array_equal(validation, get_tokenizer("gpt2").encode(corpus.text("validation")))


def test_file_corpus_edit_invalidates_cache(play_file, tmp_path):
    load_tokens(f"text:{play_file}", "train", root=tmp_path)
    play_file.write_text(make_text(350, seed=8))
    counting = CountingTokenizer()
    load_tokens(f"text:{play_file}", "train", counting, root=tmp_path)
    assert counting.calls == 1
