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
        WarmupSchedule(total_steps=10, schedule="step")
    with pytest.raises(ValueError, match="warmup_iters"):
        WarmupSchedule(total_steps=10, warmup_iters=20)


def test_schedule_is_a_plain_function_of_the_step():
    """The learning rate of step s is peak * schedule(s): nothing to restore on resume."""
    schedule = WarmupSchedule(total_steps=4, schedule="poly", power=1.0)
    assert [0.2 * schedule(s) for s in range(4)] == pytest.approx([0.2, 0.15, 0.1, 0.05])
    again = WarmupSchedule(total_steps=4, schedule="poly", power=1.0)
    assert [again(s) for s in (3, 1, 2)] == [schedule(3), schedule(1), schedule(2)]  # no hidden state
