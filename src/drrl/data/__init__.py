"""Tokenizers, corpora, cached token arrays and labelled sentence datasets."""

from drrl.data.corpora import SPLITS, TEST_PLAYS, VALIDATION_PLAYS, Corpus, get_corpus
from drrl.data.sentiment import SentenceDataset, load_sentences
from drrl.data.tokenizer import GPT2Tokenizer, HFTokenizer, Tokenizer, get_tokenizer
from drrl.data.tokens import Window, eval_windows, load_tokens, sample_batch, spread_windows

__all__ = [
    "SPLITS",
    "TEST_PLAYS",
    "VALIDATION_PLAYS",
    "Corpus",
    "GPT2Tokenizer",
    "HFTokenizer",
    "SentenceDataset",
    "Tokenizer",
    "Window",
    "eval_windows",
    "get_corpus",
    "get_tokenizer",
    "load_sentences",
    "load_tokens",
    "sample_batch",
    "spread_windows",
]
