import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtvision.metrics import BoundaryMeter, DepthMeter, Meter, NormalsMeter, SaliencyMeter, SegmentationMeter
from tests.gloo import free_port

ALL = [lambda: SegmentationMeter(3), DepthMeter, NormalsMeter, SaliencyMeter, lambda: BoundaryMeter(thresholds=5)]


@pytest.mark.parametrize("make", ALL)
def test_state_contract(make):
    m = make()
    assert isinstance(m, Meter)
    s = m.state()
    assert s.dim() == 1 and s.dtype == torch.float64 and not s.any()
    m.load_state(torch.arange(s.numel(), dtype=torch.float64))
    assert torch.equal(m.state(), torch.arange(s.numel(), dtype=torch.float64))
    m.state()[0] = -1  # state() returns a copy
    assert m.state()[0] == 0
    with pytest.raises(ValueError):
        m.load_state(torch.zeros(s.numel() + 1))
    m.reset()
    assert not m.state().any()
    m.all_reduce()  # no process group: a no-op
    assert not m.state().any()
    assert set(m.compute()) == set(type(m).higher_is_better)


def test_merge_refuses_other_kinds():
    with pytest.raises(ValueError):
        SegmentationMeter(3).merge(SegmentationMeter(4))
    with pytest.raises(ValueError):
        DepthMeter().merge(SaliencyMeter())


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = SegmentationMeter(3)
        m.update(torch.tensor([[[rank, 2]]]), torch.tensor([[[0, 2]]]))
        m.all_reduce()
        queue.put((rank, m.state().tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_sums_over_two_gloo_ranks():
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(2, port, queue), nprocs=2, join=True, start_method="spawn")
    got = dict(queue.get(timeout=30) for _ in range(2))
    expected = SegmentationMeter(3)
    expected.update(torch.tensor([[[0, 2], [1, 2]]]), torch.tensor([[[0, 2], [0, 2]]]))
    assert got[0] == got[1] == expected.state().tolist()
