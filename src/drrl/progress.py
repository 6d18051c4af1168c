"""Progress that reads well in a terminal and in a log file.

``progress(...)`` takes tqdm's arguments. When its stream (stderr by default) is a terminal it returns a
``tqdm.auto.tqdm`` bar; otherwise (output redirected to a log file) it returns a :class:`LineProgress`, which
prints no carriage returns but one plain line at most every ``interval`` seconds and a last line on close::

    train: 120/500 step (24%), 3.1 step/s, ETA 2m02s, loss=3.412 tok_s=1,234

Both support iteration, ``with``, ``update(n)``, ``set_postfix(dict or **kwargs)``, ``write(msg)`` and
``close()``. ``disable=True`` prints no progress (``write`` still prints its message, as ``tqdm.write`` does).

The environment variable ``DRRL_PROGRESS`` forces a mode: ``bar`` (tqdm, e.g. in a notebook, whose stderr is
not a terminal), ``lines`` (plain lines even in a terminal), ``off`` (no progress at all) or ``auto`` (the
default: ``bar`` on a terminal, ``lines`` otherwise).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any

from tqdm.auto import tqdm

from drrl.errors import ConfigError


def _duration(seconds: float) -> str:
    """``42s``, ``2m02s``, ``1h02m03s``."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _number(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:,.0f}"


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}"


class LineProgress:
    """tqdm's interface for log files: a plain line every ``interval`` seconds and one on close."""

    def __init__(
        self, iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
        disable: bool = False, leave: bool = True, initial: float = 0, interval: float = 10.0,
        file: IO[str] | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.disable, self.leave, self.n, self.initial = disable, leave, initial, initial
        self.interval, self.file, self.clock = interval, file, clock
        self.postfix: dict[str, Any] = {}
        self.start = self.last = clock()
        self.printed = self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress was created without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.disable and self.clock() - self.last >= self.interval:
            self._print(self.line())

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def write(self, msg: str) -> None:
        print(msg, file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        """Print the last line (unless ``leave=False`` and nothing was printed before); idempotent."""
        if not self.closed and not self.disable and (self.leave or self.printed):
            self._print(self.line(final=True))
        self.closed = True

    def line(self, final: bool = False) -> str:
        """``desc: n/total unit (pct%), rate, ETA, postfix``."""
        elapsed = self.clock() - self.start
        n, total = _count(self.n), _count(self.total or 0)
        parts = [f"{n}/{total} {self.unit} ({int(100 * self.n / self.total)}%)" if self.total else f"{n} {self.unit}"]
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts.append(f"{_number(rate)} {self.unit}/s" if rate >= 1 else f"{_number(1 / rate)} s/{self.unit}")
        if not final and self.total and rate > 0:
            parts.append(f"ETA {_duration(max(0.0, self.total - self.n) / rate)}")
        else:
            parts.append(f"elapsed {_duration(elapsed)}")
        post = " ".join(f"{k}={_number(v) if isinstance(v, float) else v}" for k, v in self.postfix.items())
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts + ([post] if post else []))

    def _print(self, line: str) -> None:
        self.write(line)
        self.last, self.printed = self.clock(), True


def progress(
    iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
    disable: bool = False, leave: bool = True, initial: float = 0, interval: float = 10.0,
    file: IO[str] | None = None, clock: Callable[[], float] = time.monotonic, **tqdm_kwargs: Any,
) -> tqdm | LineProgress:  # fmt: skip
    """A tqdm bar on a terminal, a :class:`LineProgress` otherwise (see the module docstring and ``DRRL_PROGRESS``).

    ``tqdm_kwargs`` (``dynamic_ncols``, ...) reach tqdm only; ``interval`` and ``clock`` the line mode only.
    """
    mode = os.environ.get("DRRL_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in ("auto", "bar", "lines", "off"):
        raise ConfigError(f"DRRL_PROGRESS={mode!r} is not one of auto, bar, lines, off")
    if mode == "auto":
        mode = "bar" if getattr(file or sys.stderr, "isatty", lambda: False)() else "lines"
    if mode == "bar" and not disable:
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial, file=file, **tqdm_kwargs)
    return LineProgress(
        iterable, total=total, desc=desc, unit=unit, disable=disable or mode == "off", leave=leave,
        initial=initial, interval=interval, file=file, clock=clock,
    )  # fmt: skip
