"""Tests of the resumable sampler, collate, worker seeding and build_loader."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from mtvision.data.loader import ResumableSampler, build_loader, collate, worker_init_fn
from mtvision.errors import DatasetError


class _Range(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return {"x": torch.tensor([float(index)]), "meta": {"id": f"s{index}", "size": (2, 3)}}


class _NumpyRandom(Dataset):
    """Each item is a draw from numpy's and python's global RNGs, with the worker's torch seed."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[float, float, int]:
        return float(np.random.rand()), random.random(), torch.initial_seed()


@pytest.mark.parametrize("n", [10, 11, 3])
@pytest.mark.parametrize("replicas", [1, 3, 4])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_matches_torch_distributed_sampler(n: int, replicas: int, shuffle: bool, drop_last: bool) -> None:
    if drop_last and n < replicas:  # torch would hand every rank an empty epoch
        with pytest.raises(ValueError, match="leaves nothing"):
            ResumableSampler(n, replicas, 0, drop_last=True)
        return
    dataset = list(range(n))
    for epoch in (0, 5):
        for r in range(replicas):
            ours = ResumableSampler(n, replicas, r, shuffle=shuffle, seed=7, drop_last=drop_last)
            ref = DistributedSampler(dataset, replicas, r, shuffle=shuffle, seed=7, drop_last=drop_last)
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref)
            assert len(ours) == len(ref)


def test_partition_pads_like_torch_and_covers_everything() -> None:
    n, replicas = 10, 4  # 3 per rank, 2 padded repeats
    parts = [list(ResumableSampler(n, replicas, r, seed=3)) for r in range(replicas)]
    flat = [i for part in parts for i in part]
    assert all(len(part) == 3 for part in parts)
    assert set(flat) == set(range(n))
    assert len(flat) - len(set(flat)) == 2
    counts = np.bincount(flat, minlength=n)
    assert sorted(counts.tolist()) == [1] * 8 + [2] * 2


def test_partition_is_disjoint_when_divisible() -> None:
    parts = [list(ResumableSampler(12, 3, r, seed=1)) for r in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(12))


def test_drop_last_drops_the_remainder() -> None:
    parts = [list(ResumableSampler(11, 3, r, seed=1, drop_last=True)) for r in range(3)]
    flat = [i for part in parts for i in part]
    assert len(flat) == len(set(flat)) == 9


def test_unpadded_partition_sees_each_sample_once() -> None:
    parts = [ResumableSampler(10, 4, r, seed=2, pad=False) for r in range(4)]
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert sorted(i for p in parts for i in p) == list(range(10))


def test_set_epoch_changes_order_deterministically() -> None:
    a, b = ResumableSampler(50, seed=4), ResumableSampler(50, seed=4)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    second = list(a)
    assert second != first
    assert list(b) == second
    assert sorted(second) == list(range(50))
    a.set_epoch(0)
    assert list(a) == first
    assert list(ResumableSampler(50, seed=5)) != first


@pytest.mark.parametrize("k", [0, 1, 4, 7])
def test_resume_yields_exactly_the_remaining_items(k: int) -> None:
    sampler = ResumableSampler(23, num_replicas=3, rank=1, seed=9)
    sampler.set_epoch(2)
    full = list(sampler)
    it = iter(sampler)
    seen = [next(it) for _ in range(k)]
    sampler.advance(k)
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["consumed"] == k

    resumed = ResumableSampler(23, num_replicas=3, rank=1, seed=9)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop re-selects the checkpoint's epoch: must not reset
    rest = list(resumed)
    assert seen + rest == full
    assert resumed.remaining == len(full) - k
    assert len(resumed) == len(full)


def test_resume_state_resets_on_next_epoch_and_after_a_full_epoch() -> None:
    sampler = ResumableSampler(8, seed=0)
    sampler.advance(3)
    assert len(list(sampler)) == 5
    sampler.advance(5)
    assert list(sampler) == ResumableSampler(8, seed=0).epoch_indices()  # finished epoch restarts
    sampler.advance(2)
    sampler.set_epoch(1)
    assert sampler.consumed == 0 and len(list(sampler)) == 8


def test_advance_past_epoch_end_is_an_error() -> None:
    sampler = ResumableSampler(5)
    sampler.advance(4)
    with pytest.raises(ValueError, match="end of the epoch"):
        sampler.advance(2)


def test_resume_with_another_world_size_skips_nothing_unseen() -> None:
    n = 24
    old = [ResumableSampler(n, 2, r, seed=1) for r in range(2)]
    consumed = set()
    for s in old:
        consumed.update(s.epoch_indices()[:5])
        s.advance(5)
    new = [ResumableSampler(n, 3, r, seed=1) for r in range(3)]
    rest = []
    for s in new:
        s.load_state_dict(old[0].state_dict())
        assert s.consumed == 3  # 10 global samples over 3 ranks, rounded down
        rest.extend(s)
    assert set(rest) | consumed == set(range(n))
    assert len(set(rest) & consumed) == 10 - 9  # one sample repeats, none is skipped


def test_load_state_dict_rejects_bad_state() -> None:
    sampler = ResumableSampler(6)
    with pytest.raises(KeyError, match="consumed"):
        sampler.load_state_dict({"epoch": 1})
    with pytest.raises(ValueError, match="consumed"):
        sampler.load_state_dict({"epoch": 1, "consumed": 7})


def test_sampler_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        ResumableSampler(10, num_replicas=2, rank=2)


def test_collate_stacks_tensors_and_keeps_meta_as_dicts() -> None:
    samples = [
        {"image": torch.full((3, 2, 2), float(i)), "semseg": torch.full((2, 2), i, dtype=torch.int64),
         "meta": {"id": f"img{i}", "size": (4, 5)}, "weight": 0.5 * i, "name": f"n{i}"}
        for i in range(3)
    ]
    batch = collate(samples)
    assert batch["image"].shape == (3, 3, 2, 2)
    assert torch.equal(batch["image"][:, 0, 0, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert batch["semseg"].dtype == torch.int64 and batch["semseg"][2].eq(2).all()
    assert batch["meta"] == [{"id": f"img{i}", "size": (4, 5)} for i in range(3)]
    assert isinstance(batch["meta"][0]["size"], tuple)
    assert torch.equal(batch["weight"], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert batch["name"] == ["n0", "n1", "n2"]


def test_collate_stacks_numpy_arrays() -> None:
    batch = collate([{"depth": np.ones((1, 2, 2), np.float32) * i} for i in range(2)])
    assert isinstance(batch["depth"], torch.Tensor) and batch["depth"].shape == (2, 1, 2, 2)
    assert batch["depth"][1].eq(1).all()


def test_collate_names_the_key_with_mismatched_shapes() -> None:
    samples = [
        {"image": torch.zeros(3, 4, 4), "depth": torch.zeros(1, 4, 4), "meta": {"id": "a"}},
        {"image": torch.zeros(3, 4, 4), "depth": torch.zeros(1, 4, 6), "meta": {"id": "b"}},
    ]
    with pytest.raises(DatasetError, match=r"'depth'.*'a'.*\(1, 4, 4\).*'b'.*\(1, 4, 6\).*pad"):
        collate(samples)


def test_collate_rejects_different_keys_and_empty_batches() -> None:
    with pytest.raises(DatasetError, match="depth"):
        collate([{"image": torch.zeros(1)}, {"image": torch.zeros(1), "depth": torch.zeros(1)}])
    with pytest.raises(DatasetError, match="empty"):
        collate([])


def _worker_draws(torch_seed: int) -> list[tuple[float, float, int]]:
    torch.manual_seed(torch_seed)
    loader = torch.utils.data.DataLoader(
        _NumpyRandom(), batch_size=None, num_workers=2, worker_init_fn=worker_init_fn
    )
    return [(float(a), float(b), int(c)) for a, b, c in loader]


def test_worker_init_fn_decorrelates_workers_and_is_reproducible() -> None:
    first = _worker_draws(123)
    again = _worker_draws(123)
    other = _worker_draws(124)
    # items 0, 2 come from worker 0 and items 1, 3 from worker 1
    assert first[0][:2] != first[1][:2] and first[2][:2] != first[3][:2]
    assert first[0][2] + 1 == first[1][2]  # torch's per-worker seeds: base_seed + worker_id
    assert first == again
    assert first[0][0] != other[0][0]


def test_worker_init_fn_derives_numpy_and_random_from_the_torch_seed() -> None:
    draws = _worker_draws(7)
    for worker in (0, 1):
        np_draw, py_draw, seed = draws[worker]  # each worker's first draw
        torch.manual_seed(seed)  # replay that worker's start in this process
        worker_init_fn(worker)
        assert (float(np.random.rand()), random.random()) == (np_draw, py_draw)


class _TorchSeed(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict:
        return {"seed": torch.initial_seed() % 2**62}


def _loader_worker_seed(seed: int, rank: int) -> int:
    loader = build_loader(_TorchSeed(), 1, shuffle=False, num_workers=1, seed=seed, num_replicas=2, rank=rank)
    return int(next(iter(loader))["seed"])


def test_build_loader_worker_seeds_differ_across_ranks_and_repeat_across_runs() -> None:
    torch.manual_seed(0)
    a = _loader_worker_seed(5, 0)
    torch.manual_seed(1)  # the loader's own generator, not the global RNG, decides
    assert _loader_worker_seed(5, 0) == a
    assert _loader_worker_seed(5, 1) != a
    assert _loader_worker_seed(6, 0) != a


def test_build_loader_batches_one_ranks_share_and_resumes() -> None:
    dataset = _Range(10)
    loader = build_loader(dataset, 2, shuffle=True, num_workers=0, seed=3, num_replicas=2, rank=1)
    assert isinstance(loader.sampler, ResumableSampler)
    expected = ResumableSampler(10, 2, 1, seed=3).epoch_indices()
    batches = list(loader)
    assert [int(v) for b in batches for v in b["x"].flatten()] == expected
    assert batches[0]["meta"][0]["id"] == f"s{expected[0]}"

    loader.sampler.advance(len(batches[0]["x"]))
    resumed = build_loader(dataset, 2, shuffle=True, num_workers=0, seed=3, num_replicas=2, rank=1)
    resumed.sampler.load_state_dict(loader.sampler.state_dict())
    assert [int(v) for b in resumed for v in b["x"].flatten()] == expected[2:]


def test_build_loader_with_workers_matches_in_process_loading() -> None:
    dataset = _Range(7)
    plain = build_loader(dataset, 3, shuffle=True, num_workers=0, seed=1)
    workers = build_loader(dataset, 3, shuffle=True, num_workers=2, seed=1, drop_last=True)
    assert workers.persistent_workers
    got = [b["x"].flatten().tolist() for b in workers]
    assert len(got) == 2 and all(len(b) == 3 for b in got)
    assert got == [b["x"].flatten().tolist() for b in plain][:2]


def test_forked_workers_do_not_hang_after_the_parent_used_opencv(tmp_path):
    """Regression: a worker forked while OpenCV's thread pool was busy hung in its first cv2 call."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import numpy as np, torch
        from mtvision.cv import cv2
        from mtvision.data.loader import build_loader

        big = np.random.rand(1024, 1024, 3).astype(np.float32)
        for _ in range(20):  # keep OpenCV busy in the parent, as drawing previews does
            cv2.resize(big, (1500, 1300), interpolation=cv2.INTER_LINEAR)

        class Resizing(torch.utils.data.Dataset):
            def __len__(self):
                return 8
            def __getitem__(self, i):
                return {"x": torch.from_numpy(cv2.resize(big, (64, 48)))}

        for epoch in range(2):
            n = sum(1 for _ in build_loader(Resizing(), 2, shuffle=False, num_workers=2, persistent_workers=False))
            assert n == 4
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
