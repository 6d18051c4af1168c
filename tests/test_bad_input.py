"""Bad input everywhere: random and adversarial configs, options, files and tensors for every CLI command and
public entry point.

Wrong types, negative and zero sizes, ranks above the head dimension, empty corpora, NaN/inf activations and
sequences longer than the maximum all end in one of two ways:

* a clear one-line error: ``drrl: error: <message>`` (exit 1, or 2 for config errors), an argparse usage error
  (``drrl <cmd>: error: ...``, exit 2), or from the Python API one ``DrrlError``/``ValueError`` line; or
* a documented safe fallback (drrl attention: non-finite statistics run at full rank; ``drrl compress``: a
  FLOPs ratio too small for an adapter becomes an error row of the report; ``drrl plot``: diverged steps are
  not drawn),

never a traceback and never a partially written file. Companion of test_config_fuzz.py (RunConfig.from_dict
on its own) and test_cli.py (hand-picked cases); here hypothesis drives the CLI, the files it reads and the
Python entry points. Every example is derandomized and fails fast, before any model of size is loaded.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import drrl
from drrl.attention import available_attentions, build_attention, calibrating, get_attention_class
from drrl.cli import main
from drrl.errors import CheckpointError, ConfigError, DataError, DrrlError
from drrl.train import RunConfig, train
from tests.conftest import tiny_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar (without -q, transformers' "Loading weights")
USAGE_ERROR = re.compile(r"^drrl( [a-z]+)*: error: ")


def fuzz(n: int):
    """Deterministic hypothesis settings for tests that use function-scoped fixtures (tmp_path, capsys)."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# --------------------------------------------------------------------------- helpers
def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``drrl ARGV`` in process: (exit code, stdout, stderr); argparse's SystemExit becomes its code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *needles: str) -> str:
    """The single error line of a failed command (after argparse's usage lines, if any); no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not PROGRESS.search(ln)]
    assert lines, "a failed command printed no error"
    last = lines[-1]
    if lines[0].startswith("usage: drrl"):  # argparse: its usage block, then one error line
        assert USAGE_ERROR.match(last), f"not an error line: {last!r}"
        assert all(ln.startswith(("usage:", " ")) for ln in lines[:-1]), lines
    else:
        assert len(lines) == 1 and last.startswith("drrl: error: "), f"expected one error line, got {lines!r}"
    assert sum(": error:" in ln for ln in lines) == 1, lines
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    return last


def assert_failed(code, err: str, *needles: str) -> str:
    assert code not in (0, None), f"expected a failure, got exit code {code}"
    return one_line_error(err, *needles)


def half_written(folder: Path) -> list[str]:
    """Artefacts a failed command must not leave: temporary files, checkpoints without state.json, empty or
    invalid JSON, JSON lines that do not parse."""
    bad = []
    if not folder.exists():
        return bad
    for p in folder.rglob("*"):
        rel = str(p.relative_to(folder))
        if ".tmp" in p.name or p.name.startswith(".write-test"):
            bad.append(rel)
        elif p.is_dir() and p.parent.name == "checkpoints" and not (p / "state.json").is_file():
            bad.append(rel)
        elif p.is_file() and p.suffix == ".json":
            try:
                json.loads(p.read_text())
            except ValueError:
                bad.append(rel)
        elif p.is_file() and p.suffix == ".jsonl":
            try:
                [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
            except ValueError:
                bad.append(rel)
    return bad


def fresh(tmp_path: Path) -> Path:
    """A new empty folder per hypothesis example (tmp_path is shared by all examples of a test)."""
    return Path(tempfile.mkdtemp(dir=tmp_path))


def cache_leftovers() -> list[str]:
    cache = Path(os.environ["DRRL_CACHE_DIR"])
    return [str(p) for p in cache.rglob("*") if ".tmp" in p.name] if cache.exists() else []


def set_args(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, text_corpus) -> Path:
    """A 2-step tiny GPT run (context 32, d_head 16) with one checkpoint."""
    out = tmp_path_factory.mktemp("bad-input-run") / "run"
    extra = ["train.max_steps=2", "train.eval_every=0", "train.checkpoint_every=2", "model.dropout=0.0"]
    train(RunConfig.load(None, tiny_overrides(text_corpus) + extra), out, progress=False)
    return out


@pytest.fixture(scope="module")
def deltanet_run(tmp_path_factory, text_corpus) -> Path:
    """A 2-step tiny DeltaNet run with head_k_dim 8 (what `drrl prune` reads)."""
    out = tmp_path_factory.mktemp("bad-input-deltanet") / "run"
    extra = ["model.kind=deltanet", "model.dropout=0.0", "model.deltanet.head_k_dim=8", "model.deltanet.head_v_dim=8",
             "model.deltanet.chunk_size=16", "train.max_steps=2", "train.eval_every=0", "train.checkpoint_every=2"]  # fmt: skip
    train(RunConfig.load(None, tiny_overrides(text_corpus) + extra), out, progress=False)
    return out


@pytest.fixture(scope="module")
def bad_corpora(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (path, a word the one-line error must contain): files no command can train or evaluate on."""
    d = tmp_path_factory.mktemp("bad-corpora")
    files = {
        "empty": ("", "empty"),
        "whitespace": ("  \n\n\t \n" * 20, "empty"),
        "one-line": ("HAMLET: to be.\n", "empty"),  # every line goes to the train split; the others are empty
        "not-utf8": (b"\xff\xfe\x00\x81 garbage\n" * 50, "UTF-8"),
    }
    out = {}
    for name, (content, needle) in files.items():
        p = d / f"{name}.txt"
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        out[name] = (p, needle)
    (d / "no-txt-folder").mkdir()
    out["folder-without-txt"] = (d / "no-txt-folder", "no *.txt")
    out["missing"] = (d / "does-not-exist.txt", "does not exist")
    return out


@pytest.fixture(scope="module")
def toy_tsv(tmp_path_factory) -> str:
    words = "good great fine bad awful poor film plot actor scene music".split()
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(120):
        ws = [words[j] for j in torch.randint(0, len(words), (3 + i % 5,), generator=g).tolist()]
        lines.append(" ".join(ws) + f"\t{int(sum(w in ('good', 'great', 'fine') for w in ws) > 1)}")
    p = tmp_path_factory.mktemp("bad-input-tsv") / "toy.tsv"
    p.write_text("\n".join(lines) + "\n")
    return f"tsv:{p}"


# --------------------------------------------------------------------------- 1. --set overrides through the CLI
RAW_VALUES = st.one_of(
    st.sampled_from([
        "abc", "1.5", "-1", "0", "-0.0", ".nan", ".inf", "-.inf", "1e999", "[1, 2]", "[]", "{}", "{a: 1}", "null",
        "~", "true", "no", "'7'", '""', "", "[", "{", "'", "&a [*a]", "*b", "!!binary aGk=", "!!int abc",
        "!!float x", "!!bool maybe", "!!timestamp 2001-13-45", "2001-13-45", "!!python/object:os.system ls", "0x1F",
        "1_000", "2**40", "9" * 5000, "[" * 600, "%x", "@x", "- 1", "? a", "17", "64", "1000", "8.0",
    ]),
    st.integers(-(10**6), 10**6).map(str),
    st.text(max_size=8),
)  # fmt: skip
# keys with global side effects (train.threads) or that name real data (data.corpus, data.tokenizer) are pinned
RUN_KEYS = [
    f"{section}.{name}"
    for section, names in {
        "model": ["kind", "vocab_size", "context", "n_layer", "n_head", "d_model", "mlp_ratio", "dropout", "bias",
                  "rope_base", "attention", "attention_kwargs", "deltanet", "deltanet.head_k_dim", "deltanet.gated"],
        "train": ["lr", "batch_size", "max_steps", "warmup_steps", "grad_accum", "grad_clip", "precision", "device",
                  "mode", "seed", "init_from", "log_every", "eval_every", "checkpoint_every"],
        "eval": ["context", "stride", "batch_size", "split", "corpus", "periodic_max_tokens"],
        "rl": ["lr", "alpha", "beta", "clip", "eps_start"],
        "data": ["bogus"],
    }.items()
    for name in names
] + ["trian.lr", "model", "train", "model.attention_kwargs.r_max", "=", ".", "model..n_layer", "model.n_layer.x"]  # fmt: skip
NO_CORPUS = "text:/nonexistent/drrl-bad-input/corpus.txt"  # a valid config then fails fast, before any work


@fuzz(60)
@given(sets=st.lists(st.tuples(st.sampled_from(RUN_KEYS), RAW_VALUES), min_size=1, max_size=3))
def test_train_set_overrides_fuzz(tmp_path, capsys, text_corpus, sets):
    """Random ``--set key=value`` strings (YAML parsed): a one-line config error naming the key (exit 2), or an
    accepted config that fails on the missing corpus (exit 1); the --out folder is never created."""
    out = fresh(tmp_path) / "out"
    cfg = fresh(tmp_path) / "empty.yaml"
    cfg.write_text("")
    overrides = [*tiny_overrides(text_corpus), f"data.corpus={NO_CORPUS}", *(f"{k}={v}" for k, v in sets)]
    code, stdout, err = run_cli(capsys, "-q", "train", cfg, "--out", out, *set_args(overrides))
    line = assert_failed(code, err)
    assert code in (1, 2), line
    if code == 2:  # names the offending key (or its section), or the malformed --set itself
        named = any(k.split(".")[0] and k.split(".")[0] in line for k, _ in sets)
        assert named or "--set" in line or "unknown key" in line, line
    else:
        assert "/nonexistent/drrl-bad-input" in line or "vocab_size" in line, line
    assert stdout == ""
    assert not out.exists()


ATTENTION_KWARGS = {
    name: [p for p in list(inspect.signature(get_attention_class(name).__init__).parameters)[3:]
           if p not in ("causal", "bias")]
    for name in available_attentions()
}  # fmt: skip
KWARG_VALUES = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([0, -1, 16, 17, 32, 64, 1000, 1.5, 8.0, math.nan, math.inf, -math.inf, -0.5, 0.5, 1e-300, True,
                     None, "8", "", "abc", "online", "calibrated", "fixed", "energy", "random", [8], {"a": 1}]),
)  # fmt: skip


@fuzz(60)
@given(name=st.sampled_from(available_attentions()), data=st.data())
def test_attention_kwargs_via_set_fuzz(tmp_path, capsys, text_corpus, name, data):
    """``model.attention=NAME`` with random ``attention_kwargs`` (ranks above the head dimension 16, inf, NaN,
    strings, lists): one config-error line naming model.attention_kwargs, or accepted and then the corpus error.
    Catches constructors that raise anything but ValueError on bad values (int(inf) raised OverflowError)."""
    params = ATTENTION_KWARGS[name] + ["bogus_kwarg"]
    chosen = data.draw(st.dictionaries(st.sampled_from(params), KWARG_VALUES, max_size=3))
    out = fresh(tmp_path) / "out"
    cfg = fresh(tmp_path) / "c.yaml"
    config = {"model": {"attention": name, "attention_kwargs": chosen}, "data": {"corpus": NO_CORPUS}}
    cfg.write_text(json.dumps(config, allow_nan=True).replace("NaN", ".nan").replace("Infinity", ".inf"))
    code, _, err = run_cli(capsys, "-q", "train", cfg, "--out", out, *set_args(tiny_overrides(text_corpus)[1:]))
    line = assert_failed(code, err)
    if code == 2:
        assert "model.attention" in line, line
    else:
        assert code == 1 and "/nonexistent/drrl-bad-input" in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    ("sets", "needles"),
    [
        (["model.attention=drrl", "model.attention_kwargs.r_max=17"], ["r_max", "d_head=16"]),
        (["model.attention=drrl", "model.attention_kwargs.r_max=.inf"], ["r_max", "inf"]),
        (["model.attention=drrl", "model.attention_kwargs.segment=.inf"], ["segment", "inf"]),
        (["model.attention=drrl", "model.attention_kwargs.controller=fixed", "model.attention_kwargs.rank=24"],
         ["rank", "buckets [8, 16]"]),
        (["model.attention=static", "model.attention_kwargs.rank=64"], ["rank", "d_head=16"]),
        (["model.attention=static", "model.attention_kwargs.rank=1.5"], ["rank", "1.5"]),
        (["model.n_head=-2"], ["model.n_head", "positive"]),
        (["model.d_model=0"], ["model.d_model", "positive"]),
        (["train.batch_size=abc"], ["train.batch_size", "integer"]),
        (["model.n_head=1.5"], ["model.n_head", "integer"]),
        (["train.lr=[0.1]"], ["train.lr", "number"]),
        (["train.lr=!!float x"], ["train.lr", "number"]),
        (["train.max_steps=2001-13-45"], ["train.max_steps", "integer"]),
    ],
    ids=lambda v: v[-1] if isinstance(v, list) else "",
)  # fmt: skip
def test_named_config_errors(tmp_path, capsys, text_corpus, sets, needles):
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    code, _, err = run_cli(capsys, "-q", "train", cfg, "--out", out, *set_args([*tiny_overrides(text_corpus), *sets]))
    assert code == 2
    one_line_error(err, *needles)
    assert not out.exists()


# --------------------------------------------------------------------------- 2. numeric options of every command
POSITIVE_OPTIONS = {
    "eval": ["--context", "--stride", "--batch-size"],
    "demo": ["--context", "--segment", "--windows", "--calib-windows", "--repeats", "--policy-steps", "--betas",
             "--taus"],
    "compress": ["--flops-ratio", "--context", "--calib-windows", "--windows", "--recover-steps"],
    "prune": ["--ratio", "--eval-tokens", "--recover-steps", "--kd-weight", "--decode-batch", "--repeats"],
}  # fmt: skip
OPTION_VALUES = st.one_of(
    st.sampled_from([
        "0", "-0", "-1", "1.5", "nan", "inf", "-inf", "1e999", "0x10", "", " ", ",", "1,,2", "0.5,nan", "1,-1",
        "abc", "[1]", "null", "-h", "--help", "2", "0.5", "1", "0.99", "1e-300", "-1e-9", "0.5,0.5",
    ]),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6),
)  # fmt: skip


@fuzz(80)
@given(command=st.sampled_from(sorted(POSITIVE_OPTIONS)), data=st.data())
def test_numeric_options_fuzz(tmp_path, capsys, command, data):
    """Every numeric option of eval/demo/compress/prune with random strings (``--opt=VALUE``, so '-h' is a value):
    an argparse usage error or a one-line config error; valid values reach the missing model or run and fail
    there in one line. Nothing is loaded, nothing written."""
    opts = data.draw(st.lists(st.sampled_from(POSITIVE_OPTIONS[command]), min_size=1, max_size=3, unique=True))
    values = [data.draw(OPTION_VALUES) for _ in opts]
    base = fresh(tmp_path)
    missing, out = base / "missing", base / "out"
    target = {
        "eval": [missing],
        "demo": ["--model", missing, "--out", out],
        "compress": ["--model", missing, "--out", out],
        "prune": [missing, "--out", out],
    }[command]
    code, stdout, err = run_cli(
        capsys, "-q", command, *target, *(f"{o}={v}" for o, v in zip(opts, values, strict=True))
    )
    assert_failed(code, err)
    assert stdout == ""
    assert not out.exists() and not missing.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["train"], ["eval"], ["plot"], ["data"], ["data", "prepare"], ["prune"], ["classify"], ["info", "extra"],
        ["train", "c.yaml", "--bogus"], ["eval", "run", "--split", "dev"], ["compress", "--targets", "attn"],
        ["demo", "--context", "1e3"], ["bogus"], ["eval", "run", "--context"],
    ],
    ids=" ".join,
)  # fmt: skip
def test_usage_errors_are_one_line_after_usage(capsys, argv):
    code, out, err = run_cli(capsys, "-q", *argv)
    assert code == 2
    one_line_error(err)
    assert out == ""


# --------------------------------------------------------------------------- 3. empty and degenerate corpora
def corpus_case(kind: str, path: Path, out: Path, ctx: dict) -> list:
    spec = f"text:{path}"
    return {
        "train": ["train", ctx["cfg"], "--out", out, *set_args([*tiny_overrides(spec), "train.max_steps=1"])],
        "eval": ["eval", ctx["run"], "--corpus", spec, "--out", out],  # a file path in an existing folder
        "data-prepare": ["data", "prepare", spec],
        "demo": ["demo", "--model", ctx["llama"], "--corpus", spec, "--quick", "--out", out],
        "compress": ["compress", "--model", ctx["llama"], "--calibration", spec, "--quick", "--out", out],
        "prune": ["prune", ctx["deltanet"], "--calibration", spec, "--out", out],
        "classify": ["classify", ctx["classify_cfg"], "--out", out, "--set", f"data=tsv:{path}", "--set", "quick=true"],
    }[kind]


CORPUS_COMMANDS = ["train", "eval", "data-prepare", "demo", "compress", "prune", "classify"]


@pytest.fixture(scope="module")
def corpus_ctx(tmp_path_factory, tiny_run, deltanet_run, tiny_model_dir, tiny_bert_with_tokenizer, toy_tsv):
    d = tmp_path_factory.mktemp("corpus-ctx")
    cfg = d / "empty.yaml"
    cfg.write_text("")
    classify_cfg = d / "classify.yaml"
    classify_cfg.write_text(
        f"data: '{toy_tsv}'\nmodel: '{tiny_bert_with_tokenizer}'\nseeds: [0]\nmethods:\n  - method: full\n"
    )
    return {
        "cfg": cfg,
        "run": tiny_run,
        "deltanet": deltanet_run,
        "llama": tiny_model_dir,
        "classify_cfg": classify_cfg,
    }


@pytest.mark.parametrize("corpus", ["empty", "whitespace", "one-line", "not-utf8", "folder-without-txt", "missing"])
@pytest.mark.parametrize("command", CORPUS_COMMANDS)
def test_degenerate_corpora(tmp_path, capsys, bad_corpora, corpus_ctx, command, corpus):
    """Empty, whitespace-only, one-line, non-UTF-8, missing corpora and folders without text, for every command
    that reads a corpus: exit 1 with one line that names the problem; no --out, no temporary cache files."""
    path, needle = bad_corpora[corpus]
    if command == "classify":  # tsv:PATH has its own wording for empty and degenerate files
        needle = {"empty": "no examples", "whitespace": "no examples", "one-line": "no tab", "missing": "does not exist",
                  "folder-without-txt": str(path), "not-utf8": "UTF-8"}[corpus]  # fmt: skip
    elif command in ("compress", "prune") and corpus == "one-line":  # the calibration (train) split has the line
        needle = "fewer than one window"
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "-q", *corpus_case(command, path, out, corpus_ctx))
    line = assert_failed(code, err, needle)
    assert code == 1, line
    assert stdout == "" or command == "data-prepare"  # it prints each split's count as it goes
    assert not out.exists()
    assert cache_leftovers() == []


# --------------------------------------------------------------------------- 4. sequences longer than the maximum
@fuzz(15)
@given(context=st.one_of(st.integers(33, 10**6), st.just(10**18)), via_out=st.booleans())
def test_eval_context_beyond_the_model(tmp_path, capsys, tiny_run, context, via_out):
    out = fresh(tmp_path) / "e.json"
    code, stdout, err = run_cli(capsys, "-q", "eval", tiny_run, "--context", context, *(["--out", out] * via_out))
    assert code == 1
    one_line_error(err, f"--context {context}", "maximum context 32", "--context <= 32")
    assert stdout == "" and not out.exists() and list(out.parent.iterdir()) == []


def test_models_reject_sequences_longer_than_their_context(tiny_run, deltanet_run):
    for run, cls in ((tiny_run, "GPT"), (deltanet_run, "DeltaNetLM")):
        model, _, _ = drrl.load(run)
        assert type(model).__name__ == cls
        ids = torch.zeros(1, 33, dtype=torch.long)
        with pytest.raises(ValueError, match=r"^sequence length 33 exceeds the model context 32$"):
            model(ids)
        assert model(ids[:, :32]).shape == (1, 32, model.cfg.vocab_size)  # the maximum itself is fine
    lin = build_attention("linformer", 32, 2, causal=False, max_len=16, k=4)
    with pytest.raises(ValueError, match="sequence length 17 exceeds linformer max_len=16"):
        lin(torch.randn(1, 17, 32))


def test_classify_linformer_shorter_than_the_sentences_is_a_config_error(
    tmp_path, capsys, tiny_bert_with_tokenizer, toy_tsv
):
    """Fixed: linformer with max_len below the longest sentence raised a raw ValueError mid-training."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: '{toy_tsv}'\nmodel: '{tiny_bert_with_tokenizer}'\nseeds: [0]\n")
    out = tmp_path / "out"
    methods = 'methods=[{"method": "full"}, {"method": "linformer", "attention_kwargs": {"max_len": 4, "k": 2}}]'
    code, _, err = run_cli(capsys, "-q", "classify", cfg, "--out", out, "--set", methods, "--set", "quick=true")
    assert code == 2
    one_line_error(err, "linformer", "max_len 4", "longest sentence")
    assert not out.exists()


# --------------------------------------------------------------------------- 5. NaN / inf activations
ATTN_SETUPS = [
    (name, causal)
    for name in available_attentions()
    for causal in (True, False)
    if (get_attention_class(name).supports_causal if causal else get_attention_class(name).supports_bidirectional)
]
SMALL_KW = {"drrl": {"segment": 8}, "static": {"rank": 8, "segment": 8}, "linformer": {"max_len": 64, "k": 8},
            "nystrom": {"n_landmarks": 4}, "performer": {"n_features": 16, "chunk": 8}}  # fmt: skip
D, H, L = 32, 2, 32


def small_attention(name: str, causal: bool, **extra):
    kw = {**SMALL_KW.get(name, {}), **extra}
    if name == "drrl" and not causal:
        kw.setdefault("basis", "calibrated")
    torch.manual_seed(0)
    attn = build_attention(name, D, H, causal=causal, **kw).eval()
    if name == "static" or kw.get("basis") == "calibrated":
        with calibrating(attn):
            attn(torch.randn(2, L, D, generator=torch.Generator().manual_seed(1)))
    return attn


@fuzz(25)
@given(
    setup=st.sampled_from(ATTN_SETUPS),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    row=st.integers(0, 2),
    token=st.integers(0, L - 1),
    whole_row=st.booleans(),
)
def test_nonfinite_activations_stay_in_their_row(setup, bad, row, token, whole_row):
    """NaN/inf in the input of any registered attention: no exception, the output keeps its shape, and the other
    rows of the batch are what they are without it (rows never see each other's tokens). drrl
    (documented): the segments after a non-finite token fall back to full rank, and the next call is clean."""
    name, causal = setup
    attn = small_attention(name, causal)
    x = torch.randn(3, L, D, generator=torch.Generator().manual_seed(2))
    xb = x.clone()
    if whole_row:
        xb[row] = bad
    else:
        xb[row, token] = bad
    with torch.no_grad():
        y = attn(x)
        yb = attn(xb)
        plans = getattr(attn, "last_plans", None)
    assert yb.shape == y.shape == x.shape
    others = [r for r in range(3) if r != row]
    torch.testing.assert_close(yb[others], y[others], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(y).all()
    if name == "drrl" and causal:  # online bases from prefix statistics
        first_bad = 0 if whole_row else token // 8
        after = plans[row].ranks[first_bad + 1 :]
        assert after == [D // H] * len(after), plans[row].ranks
        assert plans[row].fallbacks >= len(after)
        with torch.no_grad():
            y2 = attn(x)
        assert torch.isfinite(y2).all() and all(p.fallbacks == 0 for p in attn.last_plans)


@pytest.mark.parametrize(("name", "kw"), [("static", {"rank": 8, "segment": 8}), ("drrl", {"basis": "calibrated"})])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_calibration_on_nonfinite_data_falls_back_to_full_rank(caplog, name, kw, bad):
    """Documented (DynamicLowRankAttention.finish_calibration): a failed factorisation keeps full rank."""
    attn = build_attention(name, D, H, **kw).eval()
    data = torch.randn(1, 16, D)
    data[0, 5] = bad
    with caplog.at_level(logging.WARNING, logger="drrl"), calibrating(attn):
        attn(data)
    assert not bool(attn.calibrated)
    assert "calibration factorisation failed" in caplog.text
    with torch.no_grad():
        y = attn(torch.randn(2, L, D))
    assert torch.isfinite(y).all()
    assert all(r == D // H for p in attn.last_plans for r in p.ranks)


@pytest.mark.parametrize("attention", ["full", "drrl"])
def test_model_with_nonfinite_embedding_keeps_other_rows(attention):
    """A GPT whose embedding of one token is NaN: no exception; rows without that token are unaffected and the
    loss is NaN (the training loop turns that into a one-line error: test_diverging_training_...)."""
    kw = {"attention": attention, "attention_kwargs": {"segment": 8} if attention == "drrl" else {}}
    torch.manual_seed(0)
    model = drrl.GPT(drrl.GPTConfig(n_layer=2, n_head=2, d_model=32, context=32, vocab_size=64, **kw)).eval()
    with torch.no_grad():
        model.wte.weight[7] = math.nan
    ids = torch.randint(0, 7, (2, 32), generator=torch.Generator().manual_seed(0))
    bad = ids.clone()
    bad[1, 20] = 7
    with torch.no_grad():
        clean, logits = model(ids), model(bad)
        loss = model.loss(bad, bad)
    keep = torch.arange(64) != 7  # tied embeddings: the logit of token 7 itself is NaN everywhere
    torch.testing.assert_close(logits[0][:, keep], clean[0][:, keep])
    assert torch.isfinite(logits[0][:, keep]).all()
    assert not torch.isfinite(logits[1, 20:, keep]).any()
    assert math.isnan(loss.item())


def test_diverging_training_is_one_line_and_leaves_no_half_written_run(tmp_path, capsys, text_corpus):
    """lr=1e30 turns the loss into NaN/inf: exit 1 with one line, no eval.json and no checkpoint; the
    metrics log keeps whole lines (the steps before divergence, for diagnosis) and the folder can be reused."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    out = tmp_path / "out"
    sets = [*tiny_overrides(text_corpus), "train.lr=1e30", "train.warmup_steps=0", "train.max_steps=4",
            "train.eval_every=0", "train.checkpoint_every=0"]  # fmt: skip
    code, _, err = run_cli(capsys, "-q", "train", cfg, "--out", out, *set_args(sets))
    assert code == 1
    one_line_error(err, "loss became", "lower train.lr")
    assert not (out / "eval.json").exists() and not (out / "checkpoints").exists()
    assert half_written(out) == []
    sets += ["train.lr=1e-3", "train.max_steps=1"]  # the same --out, without --resume: nothing blocks a retry
    code, _, err = run_cli(capsys, "-q", "train", cfg, "--out", out, *set_args(sets))
    assert code == 0, err
    assert (out / "eval.json").is_file() and half_written(out) == []


def test_classify_nan_loss_is_a_one_line_error(tmp_path, capsys, tiny_bert_with_tokenizer, toy_tsv):
    """Fixed: lr=1e30 raised FloatingPointError with a traceback."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: '{toy_tsv}'\nmodel: '{tiny_bert_with_tokenizer}'\nseeds: [0]\nmethods:\n  - method: full\n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "-q", "classify", cfg, "--out", out, "--set", "quick=true", "--set", "lr=1e30")
    assert code == 1
    one_line_error(err, "full seed 0", "loss became", "lower lr")
    assert not out.exists()


# --------------------------------------------------------------------------- 6. damaged files the commands read
JSON_SCALARS = st.one_of(
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 1e300, 709.0, 710.0, -800.0, 0.0]),
    st.none(),
    st.booleans(),
    st.text(max_size=4),
)
METRIC_ROWS = st.one_of(
    st.fixed_dictionaries(
        {"step": st.one_of(st.integers(0, 100), JSON_SCALARS)},
        optional={"loss": JSON_SCALARS, "val_loss": JSON_SCALARS, "final": JSON_SCALARS, "lr": JSON_SCALARS},
    ),
    st.fixed_dictionaries({"step": st.integers(0, 100), "loss": st.floats(0.5, 12)}),
    st.one_of(JSON_SCALARS, st.lists(st.integers(0, 3), max_size=2)),  # not an object
)


@fuzz(25)
@given(rows=st.lists(METRIC_ROWS, min_size=1, max_size=5), garbage=st.sampled_from([None, "{not json", "\x00\x01"]))
def test_plot_of_damaged_metrics_fuzz(tmp_path, capsys, rows, garbage):
    """Random metrics.jsonl rows (wrong types, NaN/inf, values near the float limit, non-objects, garbage lines):
    a PNG (documented fallback: diverged or undrawable steps are left out) or a one-line error naming the file;
    never a traceback, a half-written curves.png or a temporary file."""
    run = fresh(tmp_path)
    lines = [json.dumps(r) for r in rows] + ([garbage] if garbage else [])
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code, stdout, err = run_cli(capsys, "-q", "plot", run)
    png = run / "curves.png"
    if code == 0:
        assert err == "" and png.read_bytes().startswith(PNG_MAGIC) and stdout.strip() == str(png)
    else:
        assert code == 1
        one_line_error(err, "metrics.jsonl")
        assert not png.exists()
    assert sorted(p.name for p in run.iterdir()) == sorted(["metrics.jsonl", *(["curves.png"] * (code == 0))])


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"\xff\xfe\x00garbage\n", ["not UTF-8"]),
        (b'{"step": 1, "loss": 2}\n[1, 2]\n', ["line 2", "not a JSON object"]),
        (b'{"loss": 2.0}\n', ["step None"]),
        (b'{"step": 1, "loss": NaN}\n', ["no finite losses"]),
    ],
    ids=["binary", "list-row", "no-step", "only-nan"],
)
def test_plot_named_errors(tmp_path, capsys, content, needles):
    (tmp_path / "metrics.jsonl").write_bytes(content)
    code, _, err = run_cli(capsys, "-q", "plot", tmp_path)
    assert code == 1
    one_line_error(err, *needles)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_plot_out_is_a_folder(tmp_path, capsys, tiny_run):
    """Fixed: the error named a temporary file (``Is a directory (.../.x.tmp)``)."""
    code, _, err = run_cli(capsys, "-q", "plot", tiny_run, "--out", tmp_path)
    assert code == 1
    one_line_error(err, f"--out {tmp_path} is a folder")
    assert list(tmp_path.iterdir()) == []


CONFIG_BYTES = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([
        b"\xff\xfe\x00", b"model: [", b"&a [*a]", b"model: !!python/object:os.system ls\n", b"- model\n",
        b"model: {n_layer: 2, n_layer: 3, kind: x}\n", b"train: {lr: !!float x}\n", b"train: {max_steps: 2001-13-45}\n",
        b"model:\n  attention_kwargs: {r_max: .inf}\n  attention: drrl\n", b"[" * 600, b"model:\n\tn_layer: 2\n",
    ]),
    st.text(max_size=30).map(str.encode),
)  # fmt: skip


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(content=CONFIG_BYTES)
def test_config_file_bytes_fuzz(tmp_path_factory, content):
    """Random bytes as a config file for RunConfig.load and ClassifyConfig.load: a valid config or one
    ConfigError line (non-UTF-8 files and malformed YAML scalars once escaped as UnicodeDecodeError/ValueError)."""
    from drrl.recipes.classify import ClassifyConfig

    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(content)
    for cls in (RunConfig, ClassifyConfig):
        try:
            cls.load(path)
        except ConfigError as e:
            assert str(e) and "\n" not in str(e)


def test_non_utf8_config_via_cli(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"\xff\xfe\x00model: {}\n")
    code, _, err = run_cli(capsys, "-q", "train", cfg, "--out", tmp_path / "out")
    assert code == 2
    one_line_error(err, str(cfg), "not UTF-8")
    assert not (tmp_path / "out").exists()


def damaged_state(run: Path, dst: Path, damage) -> Path:
    """A copy of the run's newest checkpoint whose state.json went through ``damage(state) -> state``."""
    (src,) = sorted((run / "checkpoints").iterdir())[-1:]
    shutil.copytree(src, dst)
    state = json.loads((dst / "state.json").read_text())
    (dst / "state.json").write_text(json.dumps(damage(state)))
    return dst


def _set(path: str, value):
    def damage(state):
        *parents, last = path.split(".")
        node = state
        for key in parents:
            node = node[key]
        node[last] = value
        return state

    return damage


STATE_DAMAGES = {
    "not-an-object": (lambda s: [1, 2], "unreadable state.json"),
    "step-list": (_set("step", [1]), "unreadable state.json"),
    "files-string": (_set("files", "abc"), "unreadable state.json"),
    "digest-int": (lambda s: {**s, "files": {**s["files"], "model.safetensors": 5}}, "sha256"),
    "file-outside": (lambda s: {**s, "files": {**s["files"], "../../../elsewhere.txt": "0" * 64}}, "sha256"),
    "config-string": (_set("config", "abc"), "mapping"),
    "model-list": (_set("config.model", [1]), "model must be a mapping"),
    "n_head-3": (_set("config.model.n_head", 3), "model.n_head"),
    "vocab-10": (_set("config.model.vocab_size", 10), "model.vocab_size"),
    "precision-fp8": (_set("config.train.precision", "fp8"), "train.precision"),
    "attention-drrl": (_set("config.model.attention", "drrl"), "does not fit the model"),
}


@pytest.mark.parametrize("damage", list(STATE_DAMAGES))
def test_eval_of_a_checkpoint_with_damaged_state(tmp_path, capsys, tiny_run, damage):
    """A hand-edited or damaged state.json (wrong types, a config that no longer fits the weights): one line."""
    fn, needle = STATE_DAMAGES[damage]
    ckpt = damaged_state(tiny_run, tmp_path / "step", fn)
    out = tmp_path / "e.json"
    code, stdout, err = run_cli(capsys, "-q", "eval", ckpt, "--out", out)
    assert_failed(code, err, needle)
    assert stdout == "" and not out.exists()


def test_eval_of_a_checkpoint_whose_files_entry_is_a_list(tmp_path, capsys, tiny_run):
    ckpt = damaged_state(tiny_run, tmp_path / "step", lambda s: {**s, "files": list(s["files"])})
    code, _, err = run_cli(capsys, "-q", "eval", ckpt)
    assert_failed(code, err, "unreadable state.json")


def test_eval_of_a_checkpoint_whose_config_does_not_fit_its_weights(tmp_path, capsys, tiny_run):
    ckpt = damaged_state(tiny_run, tmp_path / "step", _set("config.model.d_model", 64))
    code, _, err = run_cli(capsys, "-q", "eval", ckpt)
    assert_failed(code, err, "does not fit the model")


def test_quiet_prints_only_the_error_line(tmp_path, capsys, tiny_model_dir, bad_corpora):
    empty, _ = bad_corpora["empty"]
    code, _, err = run_cli(capsys, "-q", "compress", "--model", tiny_model_dir, "--calibration", f"text:{empty}",
                           "--quick", "--out", tmp_path / "out")  # fmt: skip
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("drrl: error: "), err


# --------------------------------------------------------------------------- 7. fast validation of the heavy commands
@pytest.mark.parametrize("ratio", ["0.9", "0.99", "0.5,0.95"])
def test_prune_ratio_that_empties_a_head(tmp_path, capsys, deltanet_run, ratio):
    """Fixed: a ratio in [0, 1) that leaves 0 of d_k = 8 channels raised a raw ValueError after writing
    utilisation.png into --out; now a config error before any work."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "-q", "prune", deltanet_run, "--ratio", ratio, "--out", out)
    assert code == 2
    one_line_error(err, "all 8 query/key channels", "ratio <= 0.875")
    assert not out.exists()


def test_compress_ratio_too_small_is_a_documented_error_row(tmp_path, capsys, tiny_model_dir, text_corpus):
    """Documented fallback (drrl.recipes.compress.run_compress): a (method, ratio) no adapter can meet becomes a row with
    "error" in the report, exit 0; nothing is saved for it."""
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys, "-q", "compress", "--model", tiny_model_dir, "--calibration", text_corpus, "--method", "rana,cats",
        "--flops-ratio", "1e-6", "--quick", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "rana", "cats"]
    assert all("error" in r for r in rows[1:])
    assert not (out / "models").exists() and half_written(out) == []
    assert "too small" in stdout or "raise" in stdout


def test_classify_missing_model_folder(tmp_path, capsys, toy_tsv):
    """Fixed: a missing model folder surfaced Hugging Face's 'Repo id must be in the form ...' message."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: '{toy_tsv}'\nmodel: '{tmp_path / 'no-bert'}'\n")
    code, _, err = run_cli(capsys, "-q", "classify", cfg, "--out", tmp_path / "out")
    assert code == 1
    one_line_error(err, str(tmp_path / "no-bert"), "not a folder")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 8. the Python API
EVAL_ARGS = st.one_of(
    st.none(),
    st.integers(-3, 0),
    st.sampled_from([8, 16, 32, 33, 40, 10**9, 1.5, 8.0, math.nan, math.inf, "8", True, [8]]),
)


@fuzz(15)
@given(context=EVAL_ARGS, stride=EVAL_ARGS, batch_size=EVAL_ARGS)
def test_evaluate_arguments_fuzz(tiny_run, context, stride, batch_size):
    """drrl.evaluate with random context/stride/batch_size: a result for valid ones, else one DrrlError line
    (floats and strings once reached numpy slicing as TypeError)."""
    try:
        r = drrl.evaluate(tiny_run, context=context, stride=stride, batch_size=batch_size, device="cpu")
    except DrrlError as e:
        assert str(e) and "\n" not in str(e)
        return
    ints = [v for v in (context, stride, batch_size) if v is not None]
    assert all(type(v) is int and v > 0 for v in ints)
    assert (context or 32) <= 32 and (stride is None or stride <= (context or 32))
    assert r["tokens"] > 0 and math.isfinite(r["ppl"])


@pytest.mark.parametrize(
    ("call", "error", "needle"),
    [
        (lambda d: drrl.load(d / "missing"), CheckpointError, "does not exist"),
        (lambda d: drrl.load(d), CheckpointError, "no checkpoint"),
        (lambda d: drrl.evaluate(d / "missing"), CheckpointError, "does not exist"),
        (lambda d: drrl.fit(None, d / "o", overrides="train.max_steps=1"), ConfigError, "list of key=value"),
        (lambda d: drrl.fit(None, d / "o", overrides=[1]), ConfigError, "key=value"),
        (lambda d: drrl.fit(None, d / "o", overrides=[f"data.corpus=text:{d}"]), DataError, "no *.txt"),
        (lambda d: drrl.GPTConfig(n_layer="2"), ConfigError, "n_layer must be a positive integer, got '2'"),
        (lambda d: drrl.GPTConfig(context=1.5), ConfigError, "context must be a positive integer, got 1.5"),
        (lambda d: drrl.GPTConfig(d_model=-64), ConfigError, "d_model"),
        (lambda d: drrl.GPTConfig(mlp_ratio=math.inf), ConfigError, "mlp_ratio"),
        (lambda d: drrl.GPTConfig(attention="drrl", attention_kwargs={"r_max": 65}), ConfigError, "d_head=64"),
        (lambda d: drrl.GPTConfig(attention="drrl", attention_kwargs={"r_max": math.inf}), ConfigError, "r_max"),
        (lambda d: RunConfig.load(d / "missing.yaml"), ConfigError, "not found"),
    ],
    ids=["load-missing", "load-empty-folder", "evaluate-missing", "fit-overrides-str", "fit-overrides-int",
         "fit-folder-corpus", "gptconfig-str", "gptconfig-float", "gptconfig-negative", "gptconfig-inf",
         "gptconfig-rank-above-head", "gptconfig-rank-inf", "runconfig-missing"],
)  # fmt: skip
def test_python_entry_points_raise_one_line_errors(tmp_path, call, error, needle):
    with pytest.raises(error) as e:
        call(tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


ARG_NAMES = {n: [*p, "d_model", "n_head", "causal"] for n, p in ATTENTION_KWARGS.items()}
CTOR_VALUES = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([0, -1, 2, 16, 17, 32, 64, 1000, 1.5, 8.0, 32.0, math.nan, math.inf, -math.inf, -0.5, 0.5,
                     1e-300, True, False, None, "8", "", "online", "calibrated", "fixed", "energy", "random",
                     "identity", [8], {"a": 1}]),
)  # fmt: skip


@fuzz(120)
@given(name=st.sampled_from(available_attentions()), data=st.data())
def test_attention_constructor_fuzz(name, data):
    """Registered attentions built with random sizes and settings (negative sizes, ranks above the head dimension,
    inf/NaN, strings, booleans): either a one-line ValueError, or a module whose forward on (2, 12, D) is finite.
    (inf once raised OverflowError, n_head=0 ZeroDivisionError, negative n_head was accepted.)"""
    kwargs = data.draw(st.dictionaries(st.sampled_from(ARG_NAMES[name]), CTOR_VALUES, max_size=3))
    d_model, n_head = kwargs.pop("d_model", 32), kwargs.pop("n_head", 2)
    causal = kwargs.pop("causal", get_attention_class(name).supports_causal)
    try:
        attn = build_attention(name, d_model, n_head, causal=bool(causal), **kwargs)
    except ValueError as e:
        assert str(e) and "\n" not in str(e), repr(e)
        return
    x = torch.randn(2, 12, attn.d_model, generator=torch.Generator().manual_seed(0))
    if getattr(attn, "basis", None) == "calibrated":
        with calibrating(attn):
            attn(x)
    with torch.no_grad():
        y = attn.eval()(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("attention", ["full", "drrl", "performer", "static"])
@pytest.mark.parametrize("shape", [(1, 0), (0, 8)], ids=["no-tokens", "no-rows"])
def test_empty_sequences_give_empty_outputs(attention, shape):
    """Fixed: drrl attention on zero tokens (or zero rows) raised 'torch.cat(): expected a non-empty list'."""
    attn = small_attention(attention, True)
    y = attn(torch.randn(*shape, D))
    assert y.shape == (*shape, D)


@pytest.mark.parametrize("attention", ["full", "drrl"])
def test_model_on_an_empty_sequence(attention):
    model = drrl.GPT(drrl.GPTConfig(n_layer=1, n_head=2, d_model=32, context=16, vocab_size=64, attention=attention))
    assert model(torch.zeros(1, 0, dtype=torch.long)).shape == (1, 0, 64)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"flops_ratio": math.nan}, "flops_ratio"),
        ({"flops_ratio": 0.0}, "flops_ratio"),
        ({"flops_ratio": -0.5}, "flops_ratio"),
        ({"flops_ratio": 1.5}, "flops_ratio"),
        ({"flops_ratio": math.inf}, "flops_ratio"),
        ({"method": "bogus"}, "method"),
        ({"targets": "attn"}, "targets"),
        ({"sample_tokens": 0}, "positive"),
        ({"calibration": []}, "empty"),
        ({"flops_ratio": 1e-4}, "too small"),
        ({"flops_ratio": 0.01}, "does not pay for one basis row"),  # fails at q/k/v after the MLPs were adapted
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else None,
)
def test_apply_rana_bad_input_leaves_the_model_as_it_was(kwargs, needle):
    """Fixed: a ratio that the MLPs can meet but q/k/v cannot left the model half adapted (and in eval mode)."""
    from drrl.adapters import apply_rana

    torch.manual_seed(0)
    model = drrl.GPT(drrl.GPTConfig(n_layer=2, n_head=2, d_model=32, context=16, vocab_size=256)).train()
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    kw = {"flops_ratio": 0.5, "calibration": batches, **kwargs}
    with pytest.raises(ValueError, match=needle) as e:
        apply_rana(model, kw.pop("flops_ratio"), kw.pop("calibration"), **kw)
    assert "\n" not in str(e.value)
    assert [type(m) for m in model.modules()] == types and model.training
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    ("ratio", "selector", "needle"),
    [
        (math.nan, "l1", "ratio"), (1.0, "l1", "ratio"), (-0.1, "l1", "ratio"), (0.9, "l1", "would remove all 8"),
        (0.5, "magic", "unknown selector"),
    ],
)  # fmt: skip
def test_prune_qk_bad_input_leaves_the_model_as_it_was(deltanet_run, ratio, selector, needle):
    from drrl.pruning import prune_qk

    model, _, _ = drrl.load(deltanet_run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randint(0, 50257, (1, 33), generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match=needle) as e:
        prune_qk(model, ratio, selector, batches)
    assert "\n" not in str(e.value)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_prune_qk_on_a_model_without_deltanet_layers(tiny_run):
    from drrl.pruning import prune_qk

    model, _, _ = drrl.load(tiny_run)
    with pytest.raises(ValueError, match="no DeltaNet layers"):
        prune_qk(model, 0.5, "l1", [])


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [({"r_max": 17}, "r_max must be in 1..d_head=16"), ({"controller": "fixed", "rank": 64}, "buckets"),
     ({"segment": math.inf}, "segment"), ({"basis": "nope"}, "basis")],
)  # fmt: skip
def test_hf_dynamic_rank_above_head_dim_leaves_the_model_usable(tiny_model_dir, overrides, needle):
    from drrl.integrations import apply_dynamic_rank, load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(ValueError, match=needle) as e:
        apply_dynamic_rank(model, **overrides)
    assert "\n" not in str(e.value)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)


def test_no_temporary_files_in_the_token_cache():
    """Across this module's failures, the shared token cache never keeps a temporary file."""
    assert cache_leftovers() == []
