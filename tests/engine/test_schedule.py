import math

import pytest

from mtvision.engine.schedule import WarmupSchedule


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
        WarmupSchedule(total_steps=10, schedule="stepwise")
    with pytest.raises(ValueError, match="warmup_iters"):
        WarmupSchedule(total_steps=10, warmup_iters=20)


def test_schedule_is_a_plain_function_of_the_step():
    """The learning rate of step s is peak * schedule(s): nothing to restore on resume."""
    schedule = WarmupSchedule(total_steps=4, schedule="poly", power=1.0)
    assert [0.2 * schedule(s) for s in range(4)] == pytest.approx([0.2, 0.15, 0.1, 0.05])
    again = WarmupSchedule(total_steps=4, schedule="poly", power=1.0)
    assert [again(s) for s in (3, 1, 2)] == [schedule(3), schedule(1), schedule(2)]  # no hidden state


def test_step_schedule_multiplies_at_each_milestone():
    """MTAN's NYUv2 recipe: StepLR(step_size=100 epochs, gamma=0.5) -> 1e-4 for epochs 0-99, 5e-5 after."""
    s = WarmupSchedule(total_steps=1000, schedule="step", milestones=(400, 700), gamma=0.5)
    assert [s(0), s(399), s(400), s(699), s(700), s(999)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_step_epochs_become_steps_in_the_trainer():
    from mtvision.config import OptimConfig
    from mtvision.engine.trainer import make_schedule

    schedule = make_schedule(OptimConfig(schedule="step", step_epochs=[100], step_gamma=0.5), 200 * 397, 397)
    assert schedule(100 * 397 - 1) == 1.0 and schedule(100 * 397) == 0.5
