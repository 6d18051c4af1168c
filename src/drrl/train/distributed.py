"""Multi-process training on ``torch.distributed``: DistributedDataParallel (or FSDP) under ``torchrun``.

``torchrun --nproc_per_node 2 -m drrl train CONFIG --out DIR`` starts two processes; each calls
:func:`setup`, which joins the process group torchrun describes in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): gloo on CPU, NCCL on CUDA, one GPU per
process. A plain ``drrl train`` (no ``WORLD_SIZE``) is a world of one and uses none of this.

How a step is shared. The step's global batch (``batch_size × grad_accum`` windows) is drawn from
``(seed, step)`` exactly as in a single process; process ``r`` of ``W`` reads only its contiguous share
of rows (:func:`shard_rows`) from the memory-mapped token file. Gradients are averaged across processes
(DDP for the language model; the rank policy's PPO loss is normalised globally and its gradients summed),
so the optimiser sees the gradient of the whole global batch. With no dropout and stateless attention the
run follows the single-process trajectory up to the order of floating-point sums; otherwise it is the
same training with other random streams: dropout masks of rows beyond rank 0's share, drrl's running
bases (rank 0's rows) and the policy's exploration draws differ from one process's. Either way a run can
resume with a different number of processes.

What stays identical on every process: parameters (DDP broadcasts rank 0's at the start, then every
process applies the same averaged step), buffers such as the drrl layers' running bases and the rank
policy's exploration generator (:func:`broadcast_state`, before each step, from rank 0). So for a given
batch every process takes the same rank decisions (the price: every process draws the same exploration
noise for its own rows in a step). :func:`check_in_sync` compares the parameters at each checkpoint (DDP)
and stops the run with an error if processes ever diverge.

Only rank 0 writes logs, metrics and checkpoints; a checkpoint also records every process's RNG state.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from drrl.errors import ConfigError, DrrlError
from drrl.utils import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` training processes (``size == 1``: no process group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # setup() created the process group, so teardown() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def setup(device: str = "auto", *, timeout_minutes: float = 60.0) -> tuple[World, torch.device]:
    """Join the process group that ``torchrun`` describes, or return a world of one.

    ``device`` is the config's ``train.device``; under torchrun, ``auto``/``cuda`` means this process's
    GPU ``cuda:LOCAL_RANK``. Collectives wait up to ``timeout_minutes`` (the final evaluation included).
    """
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World(), resolve_device(device)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={size}; launch with torchrun")
    if device.startswith("cuda:"):
        raise ConfigError(
            f"train.device={device} under torchrun would put every process on one GPU; use cuda (process i uses "
            "GPU LOCAL_RANK i) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    if device in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                "lower --nproc_per_node to the number of GPUs"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = resolve_device("cpu" if device == "auto" else device)
    if not dist.is_available():
        raise DrrlError("this PyTorch build has no torch.distributed; install a build with it or run one process")
    owns = not dist.is_initialized()
    if owns:
        _import_group_binding_modules()  # before the group exists, or they would hold it past teardown()
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        if dist.get_world_size() != size or dist.get_rank() != rank:
            raise DrrlError("the process group does not match RANK/WORLD_SIZE; launch with torchrun")
    world = World(rank, size, local_rank, owns)
    if not world.is_main:  # one voice: rank 0 logs, the others only warn
        logging.getLogger("drrl").setLevel(logging.WARNING)
    log.info("distributed: %d processes (%s), this is rank %d on %s", size, dist.get_backend(), rank, dev)
    return world, dev


def current_world() -> World:
    """The process group a caller has already joined (e.g. a script run under torchrun that called
    :func:`setup`), or a world of one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return World()
    return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))


def teardown(world: World) -> None:
    """Leave the process group that :func:`setup` created; call it in a ``finally`` around the work.

    On a normal exit the processes first meet at a barrier, so that none closes its connections while a
    peer is still in a collective with it. While an exception propagates there is no barrier (the peers
    may be waiting in another collective; torchrun stops them when this process exits with the error).

    Then the group is destroyed, and really freed here: its backend (gloo: two worker threads and a
    socket thread; NCCL: a watchdog) lives until the last Python reference to the group object goes, and
    ``destroy_process_group`` only drops ``torch.distributed``'s own. A group that outlives this call is
    torn down at interpreter exit, and gloo can then abort the process ("terminate called without an
    active exception", SIGABRT): a worker thread still releasing the tensors of the last collective
    needs the GIL, and a thread that asks for the GIL while Python finalises is ended with
    ``pthread_exit``, whose unwinding through a C++ destructor is ``std::terminate``. See
    :func:`_import_group_binding_modules` and :func:`_drop_cached_groups` for the references torch's own
    modules keep.
    """
    if not (world.owns_group and dist.is_initialized()):
        return
    group = dist.group.WORLD
    try:
        if sys.exc_info()[1] is None:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        _drop_cached_groups()
        gc.collect()  # a module in a reference cycle (DDP, FSDP) may hold the group too
        held = sys.getrefcount(group) - 2  # beyond this frame's name and getrefcount's argument
        del group  # normally the last reference: joins the backend's threads now
        if held > 0:
            log.debug(
                "the process group is still referenced %d more times after teardown; its threads stop only "
                "at interpreter exit",
                held,
            )


def _import_group_binding_modules() -> None:
    """Import, before the process group exists, the torch modules that bind the default group at import.

    ``torch.distributed.nn.functional`` declares ``group=group.WORLD`` as default arguments: imported after
    ``init_process_group`` (``transformers`` and ``torch.distributed.fsdp`` import it, e.g. when a model is
    built inside the run) its functions keep the live group as defaults for good, so it outlives
    :func:`teardown`. Imported first, the defaults are ``None`` (the default group at call time).
    """
    try:
        import torch.distributed.nn.functional  # noqa: F401
    except ImportError:  # a build without it binds nothing
        pass


# DTensor's module-level caches (FSDP2's parameters and gradient norms are DTensors): their entries hold
# device meshes, and a mesh holds its process group. (module, attribute path of a function that clears one)
_DTENSOR_CACHES = (
    ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),  # sharding propagation, Python and C++
    ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
    ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
    ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"),
)


def _drop_cached_groups() -> None:
    """Empty the caches in :data:`_DTENSOR_CACHES` (those this torch has; none if DTensor was never used)."""
    if "torch.distributed.tensor" not in sys.modules:
        return
    import importlib

    for module, path in _DTENSOR_CACHES:
        try:
            clear = importlib.import_module(module)
            for name in path.split("."):
                clear = getattr(clear, name)
        except (ImportError, AttributeError):  # another torch: not there under this name
            continue
        clear()


def shard_rows(n_rows: int, world: World, what: str = "train.batch_size × train.grad_accum") -> slice:
    """This process's contiguous share of a global batch of ``n_rows`` windows (``what`` names the setting)."""
    if n_rows % world.size:
        raise ConfigError(
            f"{what} = {n_rows} windows per step cannot be split over {world.size} processes; make it a "
            f"multiple of {world.size} (or change --nproc_per_node)"
        )
    share = n_rows // world.size
    return slice(world.rank * share, (world.rank + 1) * share)


def _comm_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: list[float], world: World) -> list[float]:
    """Sum a few float64 scalars over all processes (identity in a world of one)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def sum_gradients(params: Iterable[nn.Parameter], world: World, *, mean: bool = False) -> None:
    """Sum (or average) the gradients of ``params`` over all processes in one flat all-reduce. A parameter
    without a gradient on this process contributes zeros, so every process must pass the same parameters."""
    if not world.distributed:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(_comm_device())
    dist.all_reduce(flat)
    if mean:
        flat /= world.size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.device, p.dtype).clone()
        offset += n


@dataclass(frozen=True)
class Collectives:
    """What PPO needs from the process group (``drrl.rl.ppo.PPO(comm=...)``)."""

    world: World

    def sum(self, values: list[float]) -> list[float]:
        return all_sum(values, self.world)

    def sum_gradients(self, params: Iterable[nn.Parameter]) -> None:
        sum_gradients(params, self.world)


def broadcast_state(model: nn.Module, generator: torch.Generator | None, world: World) -> None:
    """Copy rank 0's buffers (running bases, counters) and the exploration generator to every process."""
    if not world.distributed:
        return
    dev = _comm_device()
    for buf in model.buffers():
        if buf.device == dev:
            dist.broadcast(buf, 0)
        else:
            t = buf.to(dev)
            dist.broadcast(t, 0)
            buf.copy_(t)
    if generator is not None:
        state = generator.get_state().to(dev)
        dist.broadcast(state, 0)
        generator.set_state(state.cpu())


def check_in_sync(model: nn.Module, world: World, step: int) -> None:
    """Raise if any process's parameters differ from rank 0's. (Buffers and the exploration generator may
    differ after a step, as each process ran its own rows; :func:`broadcast_state` realigns them before the
    next one, and checkpoints hold rank 0's.)"""
    if not world.distributed:
        return
    with torch.no_grad():
        # summed on the CPU in float64, so devices of different kinds cannot disagree by reduction order
        digest = [sum(float(t.detach().cpu().double().sum()) * (i + 1) for i, t in enumerate(model.parameters()))]
    mine = torch.tensor(digest, dtype=torch.float64, device=_comm_device())
    gathered = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(gathered, mine)
    bad = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if bad:
        raise DrrlError(
            f"the parameters of processes {bad} diverged from rank 0's by step {step}; this is a bug: please "
            "report it with the config"
        )


def gather_rng_states(world: World) -> list[dict[str, torch.Tensor]]:
    """Every process's RNG states in rank order: ``{"torch": CPU state}``, plus ``"cuda"`` (the process's own
    GPU) when training on GPUs (NCCL)."""
    if not world.distributed:
        return [{"torch": torch.get_rng_state()}]
    dev = _comm_device()
    mine = {"torch": torch.get_rng_state()}
    if dev.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state()
    out: list[dict] = [{} for _ in range(world.size)]
    for key, state in mine.items():
        gathered = [torch.empty_like(state, device=dev) for _ in range(world.size)]
        dist.all_gather(gathered, state.to(dev))
        for r, g in enumerate(gathered):
            out[r][key] = g.cpu()
    return out


def broadcast_object(obj, world: World):
    """Rank 0's ``obj`` on every process (picklable, passed between this run's own processes)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, world: World) -> list:
    """Every process's ``obj`` (picklable: results passed between this run's own processes, never a file)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


class LossModule(nn.Module):
    """``forward(x, y) = model.loss(x, y)``, so that DDP/FSDP see the loss computation as a forward call;
    ``nll`` (the summed loss, for evaluation) goes through ``forward`` too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, summed: bool = False) -> torch.Tensor:
        return self.model.nll(x, y) if summed else self.model.loss(x, y)

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self(x, y, summed=True)


def wrap(model: nn.Module, world: World, device: torch.device, strategy: str, ignore: Iterable[str] = ()) -> nn.Module:
    """The module the training step calls: ``LossModule(model)``, under DDP or FSDP when distributed.

    ``ignore`` names parameters (of ``model``) that the language-model loss does not train (the rank policy,
    trained by PPO through :class:`Collectives`); DDP leaves them alone. Buffers are synchronised by
    :func:`broadcast_state`, not by DDP.
    """
    loss_module = LossModule(model)
    ignore = set(ignore)
    if not world.distributed or not any(p.requires_grad for n, p in model.named_parameters() if n not in ignore):
        return loss_module  # nothing for DDP to do (train.mode=policy: the LM is frozen, PPO syncs the policy)
    if strategy == "fsdp":
        from drrl.train.fsdp import shard_model

        return shard_model(loss_module, device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignored = [f"model.{n}" for n in ignore] + [f"model.{n}" for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(loss_module, ignored)
    # the buffers are on the ignore list, so DDP does not broadcast them (broadcast_state does, before each step)
    return DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None)
