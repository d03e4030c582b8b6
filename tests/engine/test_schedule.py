import math

import pytest
import torch

from mtvision.engine.schedule import WarmupSchedule, build_scheduler


def test_poly_with_linear_warmup_hand_values():
    s = WarmupSchedule(total_steps=110, schedule="poly", warmup_iters=10, warmup_ratio=0.1, power=0.9)
    assert s(0) == pytest.approx(0.1)
    assert s(5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5**0.9)
    assert s(110) == pytest.approx(0.0)


def test_cosine_and_min_ratio():
    s = WarmupSchedule(total_steps=100, schedule="cosine", min_ratio=0.1)
    assert s(0) == pytest.approx(1.0)
    assert s(50) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s(100) == pytest.approx(0.1)
    assert WarmupSchedule(total_steps=10, schedule="constant")(7) == 1.0


def test_bad_schedules():
    with pytest.raises(ValueError, match="unknown schedule"):
        WarmupSchedule(total_steps=10, schedule="step")
    with pytest.raises(ValueError, match="warmup_iters"):
        WarmupSchedule(total_steps=10, warmup_iters=20)


def test_scheduler_drives_optimizer_lr_and_state_round_trips():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.2)
    sched = build_scheduler(opt, WarmupSchedule(total_steps=4, schedule="poly", power=1.0))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.15, 0.1, 0.05])
    state = sched.state_dict()
    opt2 = torch.optim.SGD([p], lr=0.2)
    sched2 = build_scheduler(opt2, WarmupSchedule(total_steps=4, schedule="poly", power=1.0))
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 4
