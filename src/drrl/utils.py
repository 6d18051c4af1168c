"""Small shared helpers: atomic writes, hashing, devices, package folders."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

CHUNK = 1 << 20


def package_dir(name: str) -> Path | None:
    """Folder of an installed package, found *without importing it* (some asset packages have
    broken or heavy imports). ``None`` when the package is not installed."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def pickle_kind(path: str | os.PathLike) -> str | None:
    """``"pickle"`` or ``"torch.save archive"`` when the file looks like one (such files can run code when
    loaded, so drrl refuses them), else None. A safetensors file starts with an 8-byte little-endian
    header length and then ``{``; a pickle with protocol 2+ starts with 0x80; torch.save writes a zip."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors (its header length may well start with the byte 0x80)
        return None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        return "torch.save archive"
    return None


def sha256_bytes(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    A crash or exception leaves ``path`` untouched (old content or absent), never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` (a model folder written whole or
    not at all: a crash or exception leaves the old folder, or none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an unknown or absent device is a one-line error."""
    from drrl.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device {name!r} is not available on this machine; use cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    """``train.precision``: ``auto`` means bf16 autocast on CUDA and fp32 on CPU."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def cache_dir() -> Path:
    """Where tokenised corpora and downloaded assets live: ``$DRRL_CACHE_DIR`` or ``~/.cache/drrl``."""
    return Path(os.environ.get("DRRL_CACHE_DIR", Path.home() / ".cache" / "drrl"))


def check_out_dir(out: Path) -> None:
    """``out`` must be a folder or creatable as one, and writable; nothing is created here."""
    from drrl.errors import DrrlError

    if out.exists() and not out.is_dir():
        raise DrrlError(f"--out {out} is a file; choose a folder")
    base = out
    while not base.exists():
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise DrrlError(f"cannot write to {base} (for --out {out}); choose a writable folder")
