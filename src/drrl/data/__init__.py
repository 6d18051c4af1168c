"""The data room: tokenizers, corpora (offline defaults, hub-only sets that fail clearly offline), cached token
arrays, training batches and evaluation windows, labelled sentence datasets and their length batching."""

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
