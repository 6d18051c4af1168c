"""Tokenizers, corpora and cached token arrays."""

from drrl.data.corpora import SPLITS, TEST_PLAYS, VALIDATION_PLAYS, Corpus, get_corpus
from drrl.data.tokenizer import GPT2Tokenizer, HFTokenizer, Tokenizer, get_tokenizer
from drrl.data.tokens import Window, eval_windows, load_tokens, sample_batch

__all__ = [
    "SPLITS",
    "TEST_PLAYS",
    "VALIDATION_PLAYS",
    "Corpus",
    "GPT2Tokenizer",
    "HFTokenizer",
    "Tokenizer",
    "Window",
    "eval_windows",
    "get_corpus",
    "get_tokenizer",
    "load_tokens",
    "sample_batch",
]
