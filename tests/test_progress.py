"""drrl.progress: tqdm on a terminal, periodic plain lines in a log file, nothing when disabled."""

from __future__ import annotations

import io

import pytest
from tqdm.auto import tqdm

from drrl.errors import ConfigError
from drrl.progress import LineProgress, progress


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRRL_PROGRESS", raising=False)


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_log_file_gets_lines_at_most_one_per_interval_and_a_final_line() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = progress(total=500, desc="train", unit="step", file=out, clock=clock, dynamic_ncols=True)
    assert isinstance(bar, LineProgress)
    for _ in range(500):
        clock.t += 0.25  # 4 steps/s: 125 s in all, a line every 10 s at most
        bar.update(1)
        bar.set_postfix(loss=f"{3.412:.3f}", tok_s=f"{1234:,.0f}")
    bar.close()
    bar.close()  # idempotent: the training loop closes twice when stopped
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    got = lines(out)
    assert 10 <= len(got) <= 125 // 10 + 1
    assert got[-1] == "train: 500/500 step (100%), 4 step/s, elapsed 2m05s, loss=3.412 tok_s=1,234"
    assert all(line.startswith("train: ") for line in got)


def test_rate_eta_and_percentage_with_a_fake_clock() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = progress(total=500, desc="train", unit="step", file=out, clock=clock)
    bar.set_postfix({"loss": "3.412", "tok_s": "1,234"})  # a dict, like tqdm
    clock.t += 40.0
    bar.update(124)  # 3.1 step/s; 376 steps left: ETA 121.3 s
    assert lines(out) == ["train: 124/500 step (24%), 3.1 step/s, ETA 2m01s, loss=3.412 tok_s=1,234"]


def test_slow_rate_reads_seconds_per_unit_and_unknown_total_shows_elapsed() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = progress(desc="fit", unit="site", file=out, clock=clock)
    clock.t += 25.0
    bar.update(10)
    clock.t += 5.0
    bar.update(5)  # 15 sites in 30 s, 5 s after the last line: no line
    bar.set_postfix(err=0.012345)
    bar.close()
    assert lines(out) == ["fit: 10 site, 2.5 s/site, elapsed 25s", "fit: 15 site, 2 s/site, elapsed 30s, err=0.0123"]


def test_resumed_bar_counts_its_rate_from_initial() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = progress(total=1000, initial=400, desc="train", unit="step", file=out, clock=clock)
    clock.t += 3600.0
    bar.update(300)  # 300 steps in an hour, 300 left
    assert lines(out) == ["train: 700/1000 step (70%), 12 s/step, ETA 1h00m00s"]


def test_iteration_yields_every_item_then_closes() -> None:
    out, clock = io.StringIO(), FakeClock()
    items = []
    for x in progress(range(7), desc="calibrate", unit="win", file=out, clock=clock):
        clock.t += 1.0
        items.append(x)
    assert items == list(range(7))
    assert lines(out) == ["calibrate: 7/7 win (100%), 1 win/s, elapsed 7s"]


def test_leave_false_skips_the_final_line_of_a_quick_bar_only() -> None:
    out, clock = io.StringIO(), FakeClock()
    for _ in progress(range(3), desc="quick", leave=False, file=out, clock=clock):
        clock.t += 1.0
    assert out.getvalue() == ""
    for _ in progress(range(3), desc="slow", leave=False, file=out, clock=clock):
        clock.t += 6.0
    assert lines(out) == ["slow: 2/3 it (66%), 6 s/it, ETA 6s", "slow: 3/3 it (100%), 6 s/it, elapsed 18s"]


def test_context_manager_closes() -> None:
    out, clock = io.StringIO(), FakeClock()
    with progress(total=2, desc="job", file=out, clock=clock) as bar:
        clock.t += 2.0
        bar.update(2)
    assert lines(out)[-1] == "job: 2/2 it (100%), 1 it/s, elapsed 2s"


def test_write_prints_its_own_line() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = progress(total=10, desc="train", file=out, clock=clock)
    bar.write("step 5: val loss 3.2000")
    assert lines(out) == ["step 5: val loss 3.2000"]


def test_disable_prints_nothing() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = progress(range(50), total=50, desc="quiet", disable=True, file=out, clock=clock)
    for _ in bar:
        clock.t += 100.0
        bar.set_postfix(loss=1.0)
    bar.update(5)
    bar.close()
    assert out.getvalue() == ""


def test_terminal_gets_a_tqdm_bar() -> None:
    out = Tty()
    bar = progress(total=3, desc="train", unit="step", file=out, dynamic_ncols=True)
    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.set_postfix(loss="1.0")
    bar.close()
    assert "\r" in out.getvalue() and "3/3" in out.getvalue()
    with progress(total=3, file=Tty(), disable=True) as quiet:  # disabled on a terminal too: nothing
        quiet.update(3)


@pytest.mark.parametrize(
    ("mode", "stream", "kind"),
    [
        ("lines", Tty, LineProgress),
        ("bar", io.StringIO, tqdm),
        ("auto", Tty, tqdm),
        ("AUTO", io.StringIO, LineProgress),
    ],
)
def test_env_var_forces_a_mode(monkeypatch: pytest.MonkeyPatch, mode: str, stream: type, kind: type) -> None:
    monkeypatch.setenv("DRRL_PROGRESS", mode)
    bar = progress(total=1, file=stream())
    assert isinstance(bar, kind)
    bar.close()


def test_env_var_off_prints_no_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRRL_PROGRESS", "off")
    out, clock = Tty(), FakeClock()
    bar = progress(total=10, file=out, clock=clock)
    for _ in range(10):
        clock.t += 100.0
        bar.update(1)
    bar.close()
    assert out.getvalue() == ""


def test_env_var_typo_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRRL_PROGRESS", "bars")
    with pytest.raises(ConfigError, match="DRRL_PROGRESS='bars' is not one of auto, bar, lines, off"):
        progress(total=1)


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    bar = progress(total=1, desc="x", clock=clock)  # pytest's captured stderr is not a terminal
    clock.t += 1.0
    bar.update(1)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == "" and "x: 1/1 it (100%)" in captured.err
