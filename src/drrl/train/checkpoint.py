"""Checkpoints: safetensors tensors + a JSON of everything else, written atomically, hash-checked.

Layout of ``RUN/checkpoints/step_0000050/``::

    model.safetensors      model weights (shared/tied tensors handled by safetensors)
    optimizer.safetensors  optimizer tensors, keys "<param index>.<name>"
    rng.safetensors        torch (and CUDA) RNG states
    state.json             step, config, optimizer scalars and param groups, data position,
                           and the sha256 of each file above

A checkpoint is built in a hidden temporary folder and renamed into place, so a killed run never
leaves a half-written ``step_*`` folder. Nothing is unpickled: tensors come from safetensors and
the rest from JSON.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from drrl.errors import CheckpointError
from drrl.utils import pickle_kind, sha256_file

log = logging.getLogger(__name__)
FORMAT = 1
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


@dataclass
class Checkpoint:
    path: Path
    state: dict  # parsed state.json

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def config(self) -> dict:
        return self.state["config"]

    def load_model(self, model: torch.nn.Module) -> None:
        try:
            missing, unexpected = load_model(model, self.path / "model.safetensors", strict=False)
        except (SafetensorError, RuntimeError) as e:
            detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise CheckpointError(
                f"checkpoint {self.path} does not fit the model ({detail}); check the config"
            ) from None
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {self.path} does not fit the model (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}); check the config"
            )

    def optimizer_state_dict(self, name: str = "optimizer") -> dict:
        """The saved state of ``optimizer`` (or of the extra optimizer saved under ``name``, e.g. the policy's),
        keyed by parameter index like ``Optimizer.state_dict()``."""
        if f"{name}.safetensors" not in self.state["files"]:
            raise CheckpointError(f"checkpoint {self.path} has no {name}; it was written by a run without one")
        tensors = load_file(self.path / f"{name}.safetensors")
        state: dict[int, dict] = {}
        for key, t in tensors.items():
            idx, param = key.split(".", 1)
            state.setdefault(int(idx), {})[param] = t
        saved = self.state["optimizer"] if name == "optimizer" else self.state["extra_optimizers"][name]
        groups = [  # JSON turned tuples (AdamW betas) into lists
            {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
            for g in saved["param_groups"]
        ]
        return {"state": state, "param_groups": groups}

    def load_optimizer(self, optimizer: torch.optim.Optimizer, name: str = "optimizer") -> None:
        """Restore ``optimizer`` (or the extra optimizer saved under ``name``)."""
        optimizer.load_state_dict(self.optimizer_state_dict(name))

    def restore_rng(self, rank: int = 0) -> bool:
        """Restore the RNG state of training process ``rank`` (0 in a single-process run); False if the run
        that wrote the checkpoint had no such process (it resumed with more processes)."""
        rng = load_file(self.path / "rng.safetensors")
        suffix = "" if rank == 0 else f".rank{rank}"
        if f"torch{suffix}" not in rng:
            return False
        torch.set_rng_state(rng[f"torch{suffix}"])
        if f"cuda{suffix}" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[f"cuda{suffix}"])
        return True


def _optimizer_tensors(optimizer: torch.optim.Optimizer | dict) -> tuple[dict, list]:
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | dict,
    extra: dict,
    keep: int = 2,
    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None,
    rng_states: list[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step_<step>`` atomically and keep the newest ``keep`` checkpoints.
    ``optimizer`` may also be a state dict (an FSDP run's, gathered to one process). ``extra_optimizers`` (e.g. ``{"policy_optimizer": ...}``) are saved beside the main one; ``rng_states``
    are the RNG states (``{"torch": ..., "cuda": ...}``) of every training process of a distributed run, in
    rank order."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        opt_tensors, groups = _optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        for r, states in enumerate(rng_states or []):
            for kind, state in states.items():
                rng[kind if r == 0 else f"{kind}.rank{r}"] = state
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        extra_groups = {}
        for name, opt in (extra_optimizers or {}).items():
            tensors, extra_groups[name] = _optimizer_tensors(opt)
            save_file(tensors, str(tmp / f"{name}.safetensors"))
        files = (*FILES, *(f"{name}.safetensors" for name in extra_groups))
        state = {
            "format": FORMAT,
            "step": step,
            "optimizer": {"param_groups": groups},
            "files": {f: sha256_file(tmp / f) for f in files},
            **extra,
        }
        if extra_groups:
            state["extra_optimizers"] = {name: {"param_groups": g} for name, g in extra_groups.items()}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        for f in (*files, "state.json"):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a damaged checkpoint of the same step: move it aside, never delete it first
            os.replace(final, root / f".damaged-{final.name}-{os.getpid()}")
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """``step_*`` folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def load_checkpoint(path: Path) -> Checkpoint:
    """Open and verify one checkpoint folder; raises :class:`CheckpointError` if it is damaged."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path} is not a drrl checkpoint (no state.json); pass a run folder or a step_* folder")
    try:
        state = json.loads((path / "state.json").read_text())
        files = state["files"]
        int(state["step"])
        if (
            state.get("format") != FORMAT
            or "config" not in state
            or not isinstance(files, dict)
            or not set(FILES) <= set(files)
        ):
            raise KeyError("format")
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(
            f"checkpoint {path} is corrupt (unreadable state.json); use an earlier checkpoint"
        ) from None
    for name, digest in files.items():
        f = path / name
        if f.is_file() and (kind := pickle_kind(f)):
            raise CheckpointError(
                f"{f} is a {kind}, not safetensors; drrl never unpickles files (loading one can run arbitrary "
                "code): use a checkpoint written by drrl"
            )
        if not f.is_file() or sha256_file(f) != digest:
            raise CheckpointError(
                f"checkpoint {path} is corrupt or truncated ({name} fails its sha256 check); use an earlier checkpoint"
            )
    return Checkpoint(path, state)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """Newest checkpoint of a run that passes its hash check; damaged ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint: %s", e)
    return None


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """Accept a run folder (newest valid checkpoint) or a ``step_*`` folder (exactly that one)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist; pass a run folder written by `drrl train` or a checkpoint folder"
        )
    if (path / "state.json").is_file():
        return load_checkpoint(path)
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        if list_checkpoints(path):
            raise CheckpointError(f"every checkpoint in {path} is corrupt or truncated; retrain or restore a backup")
        raise CheckpointError(f"no checkpoint in {path}; pass a run folder written by `drrl train`")
    return ckpt
