"""Tests of the torchrun plumbing: environment checks, collectives over two gloo processes, seeding."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from mtvision import distributed as D
from mtvision.distributed import DistInfo, DistributedError, init_distributed
from tests.gloo import free_port

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_needs_no_environment(clean_env: pytest.MonkeyPatch) -> None:
    info = init_distributed(device="cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    assert info.is_main and not info.is_distributed
    assert not torch.distributed.is_initialized()


def test_world_size_one_from_torchrun_is_not_distributed(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        clean_env.setenv(name, value)
    info = init_distributed(device="cpu", backend="gloo")
    assert info.world_size == 1 and info.backend is None and not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2 is outside"),
        ({"RANK": "1"}, "WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "RANK is not"),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "LOCAL_RANK is not"),
        ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "1"}, "MASTER_ADDR"),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2 is outside"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE must be >= 1"),
    ],
)
def test_inconsistent_environment_is_a_clear_error(clean_env: pytest.MonkeyPatch, env: dict, match: str) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(DistributedError, match=match):
        init_distributed(device="cpu")


def test_cuda_requested_without_cuda_is_an_error(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DistributedError, match="CUDA is not available"):
        init_distributed(device="cuda")
    assert init_distributed(device="auto").device == torch.device("cpu")


def test_bad_device_and_backend_are_errors(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(DistributedError, match="unsupported device"):
        init_distributed(device="meta")
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "1"}.items():
        clean_env.setenv(name, value)
    with pytest.raises(DistributedError, match="'nccl' needs CUDA"):
        init_distributed(device="cpu", backend="nccl")


def test_helpers_are_noops_without_a_process_group() -> None:
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_sum_(t) is t and t.tolist() == [1.0, 2.0]
    assert D.all_reduce_mean_(t).tolist() == [1.0, 2.0]
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.all_gather_objects(5) == [5]
    assert (D.rank(), D.world_size(), D.is_main_process()) == (0, 1, True)
    D.barrier()
    D.cleanup()
    with pytest.raises(DistributedError, match="floating-point"):
        D.all_reduce_mean_(torch.tensor([1, 2]))


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seed_everything_offsets_by_rank_and_repeats() -> None:
    assert D.seed_everything(10, rank=2) == 12
    a = _draws()
    D.seed_everything(12)
    assert _draws() == a
    D.seed_everything(10, rank=0)
    b = _draws()
    assert all(x != y for x, y in zip(a, b))


def test_seed_everything_deterministic_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        D.seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        D.seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic


def test_unwrap_model_sees_through_torch_compile_and_data_parallel() -> None:
    inner = nn.Linear(2, 2)
    assert D.unwrap_model(inner) is inner
    assert D.unwrap_model(nn.DataParallel(inner)) is inner
    assert D.unwrap_model(torch.compile(nn.DataParallel(inner))) is inner


def _worker(local_rank: int, port: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # forked child: keep clear of the parent's OpenMP pool
    os.environ.update(
        RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    info = init_distributed(device="cpu", timeout_s=60)
    try:
        summed = torch.tensor([local_rank + 1.0, 10.0 * (local_rank + 1)])
        D.all_reduce_sum_(summed)
        mean = torch.tensor([2.0 * local_rank, 5.0])
        D.all_reduce_mean_(mean)
        counts = torch.arange(6, dtype=torch.int64).reshape(2, 3)[:, ::2]  # non-contiguous view
        D.all_reduce_sum_(counts)
        payload = D.broadcast_object({"from": D.rank(), "tuple": (1, "a")} if info.is_main else None)
        gathered = D.all_gather_objects(("rank", D.rank(), [D.rank()] * (D.rank() + 1)))
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
        unwrapped = D.unwrap_model(ddp) is ddp.module
        D.barrier()
        result = {
            "info": (info.rank, info.world_size, info.local_rank, str(info.device), info.backend, info.is_main,
                     info.is_distributed),
            "helpers": (D.rank(), D.world_size(), D.is_main_process()),
            "summed": summed.tolist(), "mean": mean.tolist(), "counts": counts.tolist(),
            "payload": payload, "gathered": gathered, "unwrapped": unwrapped,
        }
        torch.save(result, Path(out_dir) / f"rank{local_rank}.pt")
    finally:
        D.cleanup()
    assert not torch.distributed.is_initialized()


def test_two_gloo_processes_reduce_broadcast_and_gather(tmp_path: Path) -> None:
    # fork: children start in milliseconds instead of re-importing torch (spawn takes ~20 s on 2 busy cores)
    context = mp.start_processes(
        _worker, args=(free_port(), 2, str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):  # raises if a child failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo processes did not finish within 60 s")
    for r in range(2):
        result = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert result["info"] == (r, 2, r, "cpu", "gloo", r == 0, True)
        assert result["helpers"] == (r, 2, r == 0)
        assert result["summed"] == [3.0, 30.0]
        assert result["mean"] == [1.0, 5.0]
        assert result["counts"] == [[0, 4], [6, 10]]
        assert result["payload"] == {"from": 0, "tuple": (1, "a")}
        assert result["gathered"] == [("rank", 0, [0]), ("rank", 1, [1, 1])]
        assert result["unwrapped"] is True
