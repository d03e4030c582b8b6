"""Run a function on N gloo processes (fork) and collect what each rank returns, for DDP-exactness tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str, fn: Callable[[int], dict[str, torch.Tensor]]) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tensors = {k: v.detach().contiguous() for k, v in fn(rank).items()}
        save_file(tensors, str(Path(folder) / f"rank{rank}.safetensors"))
    finally:
        torch.distributed.destroy_process_group()


def run_on_ranks(fn: Callable[[int], dict[str, torch.Tensor]], world: int, folder: Path) -> list[dict[str, torch.Tensor]]:
    """`fn(rank)` on `world` forked gloo processes; the tensors each returned, by rank."""
    ctx = torch.multiprocessing.start_processes(
        _worker, args=(world, free_port(), str(folder), fn), nprocs=world, join=False, start_method="fork"
    )
    while not ctx.join(timeout=120):
        pass
    return [load_file(str(Path(folder) / f"rank{r}.safetensors")) for r in range(world)]
