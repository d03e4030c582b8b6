"""torchrun plumbing: process-group set-up from the environment, collectives, seeding, unwrapping.

Every helper works the same in a plain single-process run (no environment variables needed):
collectives become no-ops, `rank()` is 0 and `world_size()` is 1.  `torchrun` (single- or
multi-node, with `--nnodes` and a rendezvous backend) exports RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, which `init_distributed` reads.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtvision.errors import MTVisionError

_LAUNCH_HINT = "launch multi-process runs with torchrun, e.g. `torchrun --nproc_per_node=2 tools/train.py ...`"


class DistributedError(MTVisionError, RuntimeError):
    """The distributed environment is inconsistent or unusable."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank, world size, rank on its node, device and backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the process that logs and writes checkpoints)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer; {_LAUNCH_HINT}") from None


def _read_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, checked for consistency."""
    world = _env_int("WORLD_SIZE", None)
    rank = _env_int("RANK", None)
    if world is None:
        if rank not in (None, 0):
            raise DistributedError(f"RANK={rank} is set but WORLD_SIZE is not; {_LAUNCH_HINT}")
        world = 1
    if world < 1:
        raise DistributedError(f"WORLD_SIZE must be >= 1, got {world}")
    if rank is None:
        if world > 1:
            raise DistributedError(f"WORLD_SIZE={world} is set but RANK is not; {_LAUNCH_HINT}")
        rank = 0
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    local_rank = _env_int("LOCAL_RANK", rank if world == 1 else None)
    if local_rank is None:
        raise DistributedError(f"WORLD_SIZE={world} is set but LOCAL_RANK is not; {_LAUNCH_HINT}")
    local_world = _env_int("LOCAL_WORLD_SIZE", None)
    if local_rank < 0 or (local_world is not None and local_rank >= local_world):
        bound = f"LOCAL_WORLD_SIZE={local_world}" if local_world is not None else "infinity"
        raise DistributedError(f"LOCAL_RANK={local_rank} is outside [0, {bound})")
    if world > 1 and local_rank > rank:
        raise DistributedError(f"LOCAL_RANK={local_rank} exceeds RANK={rank}; the local rank counts within a node")
    if world > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise DistributedError(f"WORLD_SIZE={world} but {' and '.join(missing)} unset; {_LAUNCH_HINT}")
    return rank, world, local_rank


def _pick_device(device: str, local_rank: int, distributed: bool) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DistributedError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise DistributedError(f"unsupported device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise DistributedError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    count = torch.cuda.device_count()
    if distributed:
        if dev.index is not None and dev.index != local_rank:
            raise DistributedError(
                f"device {device!r} conflicts with LOCAL_RANK={local_rank}: under torchrun pass device='cuda' "
                "and each process takes the GPU of its local rank"
            )
        index = local_rank
    else:
        index = 0 if dev.index is None else dev.index
    if index >= count:
        raise DistributedError(
            f"process needs GPU {index} but only {count} visible; start at most {count} processes per node "
            "(torchrun --nproc_per_node) or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", index)


def _pick_backend(backend: str | None, device: torch.device) -> str:
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed support")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise DistributedError("backend 'nccl' needs CUDA devices; use backend 'gloo' (the default) on CPU")
    if backend == "nccl" and not dist.is_nccl_available():
        raise DistributedError("backend 'nccl' is not available in this torch build; use 'gloo'")
    if backend == "gloo" and not dist.is_gloo_available():
        raise DistributedError("backend 'gloo' is not available in this torch build")
    return backend


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Set up this process from torchrun's environment and return where it stands.

    `device`: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N' (single process only;
    under torchrun each process uses GPU LOCAL_RANK).  `backend`: defaults to NCCL on CUDA, gloo on
    CPU.  The process group is created only when WORLD_SIZE > 1; an existing group is reused.
    """
    if timeout_s <= 0:
        raise DistributedError(f"timeout_s must be positive, got {timeout_s}")
    rank, world, local_rank = _read_env()
    distributed = world > 1
    dev = _pick_device(device, local_rank, distributed)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not distributed:
        return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=None)
    name = _pick_backend(backend, dev)
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise DistributedError(
                f"a process group already exists with rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but the environment says rank {rank} of {world}"
            )
        return DistInfo(rank, world, local_rank, dev, str(dist.get_backend()))
    # device_id (bind NCCL to this GPU eagerly) only on CUDA: older torch lacks the argument.
    extra: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(
        backend=name, init_method="env://", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **extra
    )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=name)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def cleanup() -> None:
    """Destroy the process group if one exists (safe to call in any run)."""
    if _active():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process; no-op when not distributed."""
    if _active():
        dist.barrier()


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if _active() else 0


def is_main_process() -> bool:
    """True on global rank 0, and in single-process runs."""
    return rank() == 0


def _comm_device(tensor: Tensor) -> torch.device:
    """The device the backend can reduce on: the current GPU for NCCL, else the tensor's own."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum `tensor` over all processes, in place; returns it.  No-op when not distributed.

    A CPU tensor under NCCL is staged through the current GPU and copied back.
    """
    if not _active():
        return tensor
    device = _comm_device(tensor)
    if device == tensor.device and tensor.is_contiguous():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    staged = tensor.to(device).contiguous()
    dist.all_reduce(staged, op=dist.ReduceOp.SUM)
    tensor.copy_(staged)
    return tensor


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """Average a floating-point `tensor` over all processes, in place; returns it."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise DistributedError(f"all_reduce_mean_ needs a floating-point tensor, got {tensor.dtype}")
    all_reduce_sum_(tensor)
    n = world_size()
    if n > 1:
        tensor.div_(n)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as held by rank `src`, on every process (picklable objects only)."""
    if not _active():
        if src != 0:
            raise DistributedError(f"src={src} but this is a single-process run")
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (`[obj]` when not distributed)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int, rank: int = 0, deterministic: bool = False) -> int:
    """Seed python, numpy and torch (all devices) with `seed + rank`; returns that seed.

    `deterministic=True` makes torch raise on nondeterministic kernels, disables cuDNN autotuning
    and sets CUBLAS_WORKSPACE_CONFIG (needed by deterministic cuBLAS) unless already set;
    `deterministic=False` lifts the first two again.
    """
    if seed < 0 or rank < 0:
        raise ValueError(f"seed and rank must be non-negative, got seed={seed}, rank={rank}")
    effective = seed + rank
    random.seed(effective)
    np.random.seed(effective % 2**32)
    torch.manual_seed(effective)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        if torch.are_deterministic_algorithms_enabled():  # the setter imports torch._dynamo: seconds
            torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    return effective


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside any nesting of DistributedDataParallel, DataParallel and torch.compile."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
