"""Compiled CPU kernels, each beside the PyTorch reference it must equal (the lowest room: it imports no other).

``masked_rows(rows, c, tau, scale=None, bias=None, keep=None)``: y[t] = bias + Σ_{i kept} c[t, i]·rows[i], kept where
c[t, i]² ≥ τ (RaNA's rank adapters), |c[t, i]|·scale[i] ≥ τ (a neuron mask with weight-column norms) or where a
given boolean ``keep`` says (a mask decided on another tensor: CATS's gate), reading
each kept row of a row-major (n, d) matrix once for all tokens that keep it, without a gathered copy. It is the
decode path of :mod:`drrl.adapters.layers` (batch-1 and small-batch steps).

``masked_dots(rows, x, keep)``: out[t, i] = rows[i]·x[t] where keep[t, i], else 0, reading each kept row once (the
rows of CATS's up projection whose gate is kept).

The C++ source (``masked.cpp``) is compiled by :mod:`torch.utils.cpp_extension` (gcc, ninja): ``make install``
builds it (``python -m drrl.kernels``), into ``<venv>/share/drrl-kernels/<cpu>``, keyed by this CPU's instruction set
since it is built with ``-march=native``. Where it cannot be built (no compiler), :func:`available` is False, one
warning says why, and both ops run their PyTorch references.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("masked.cpp")
_FLAGS = ["-O3", "-march=native"]
_state: dict = {}


def _cpu_key() -> str:
    """A short name of this CPU's instruction set (the flags of /proc/cpuinfo where there is one)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()}-{hashlib.sha1(flags.encode()).hexdigest()[:10]}"


def build_dir() -> Path:
    """Where the compiled kernels live: ``$DRRL_KERNEL_DIR`` or ``<sys.prefix>/share/drrl-kernels/<cpu>``."""
    root = os.environ.get("DRRL_KERNEL_DIR") or Path(sys.prefix, "share", "drrl-kernels")
    return Path(root, _cpu_key())


def load(verbose: bool = False):
    """The compiled extension (built on first use if ``make install`` did not), or None where it cannot be
    built; the reason is logged once."""
    if "ext" in _state:
        return _state["ext"]
    _state["ext"] = None
    try:
        import shutil

        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # the ninja wheel's binary, where the venv's bin is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        where = build_dir()
        where.mkdir(parents=True, exist_ok=True)
        _state["ext"] = cpp_extension.load(name="drrl_cpu_kernels", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                                           build_directory=str(where), verbose=verbose)  # fmt: skip
    except Exception as e:  # no compiler, no ninja, a read-only prefix: the reference serves, said once
        _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        log.warning("drrl CPU kernels unavailable (%s); adapters decode through the PyTorch reference. "
                    "Install gcc and ninja, then run `python -m drrl.kernels`.", _state["error"])  # fmt: skip
    return _state["ext"]


def available() -> bool:
    """Whether the compiled kernels load on this machine."""
    return load() is not None


def _serving(rows: torch.Tensor, *others: torch.Tensor | None):
    """The extension if it serves these tensors (CPU, float32 or bfloat16, ``others`` of the rows' dtype, nothing
    that needs a gradient), else None."""
    ext = load()
    if ext is None or rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.bfloat16):
        return None
    if any(t is not None and t.dtype != rows.dtype for t in others):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (rows, *others)):
        return None
    return ext


def masked_rows_reference(rows: torch.Tensor, c: torch.Tensor, tau: float, scale: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The PyTorch expression the kernel equals: the kept mask in ``c``'s dtype, then one matmul. Returns
    (y (T, d), kept count per token (T,))."""
    if keep is not None:
        m = keep
    else:
        t = torch.tensor(tau, dtype=torch.float32).to(c.dtype)
        m = (c.square() if scale is None else c.abs() * scale.to(c.dtype)) >= t
    y = (c * m) @ rows
    return (y if bias is None else y + bias), m.sum(-1)


def masked_rows(rows: torch.Tensor, c: torch.Tensor, tau: float, scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """y[t] = bias + Σ_{i kept} c[t, i]·rows[i] and the kept count per token (module docstring). ``rows`` (n, d)
    and ``c`` (T, n) CPU tensors of one dtype (float32 or bfloat16); ``scale`` (n,) float32 or None; ``bias`` (d,)
    of that dtype or None; ``keep`` (T, n) bool or None. Runs the compiled kernel where it loads and the tensors
    suit it (no autograd), the reference otherwise."""
    ext = _serving(rows, c, bias)
    if ext is None:
        return masked_rows_reference(rows, c, tau, scale, bias, keep)
    if scale is not None:
        scale = scale.float().contiguous()
    if keep is not None:
        keep = keep.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    y, active = ext.masked_rows(rows.contiguous(), c.contiguous(), scale, float(tau), bias, keep)
    return y, active


def masked_dots_reference(rows: torch.Tensor, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The PyTorch expression :func:`masked_dots` equals: (x @ rowsᵀ) where ``keep``, 0 elsewhere."""
    return (x @ rows.t()) * keep


def masked_dots(rows: torch.Tensor, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """out[t, i] = rows[i]·x[t] where ``keep[t, i]``, else 0 (module docstring): ``rows`` (n, d), ``x`` (T, d) CPU
    tensors of one dtype (float32 or bfloat16), ``keep`` (T, n) bool. The compiled kernel where it loads and the
    tensors suit it (no autograd), the reference otherwise."""
    ext = _serving(rows, x)
    if ext is None:
        return masked_dots_reference(rows, x, keep)
    return ext.masked_dots(rows.contiguous(), x.contiguous(), keep.contiguous())
