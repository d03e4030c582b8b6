import math

import pytest

from mtvision.engine.selection import SelectionError, Selector
from mtvision.tasks import resolve_tasks

TASKS = resolve_tasks(["semseg", "depth"], {"semseg": 3})


def metrics(miou, rmse):
    return {"semseg": {"mIoU": miou, "pixAcc": 50.0}, "depth": {"rmse": rmse}}


def test_delta_m_against_the_first_usable_evaluation():
    sel = Selector("delta_m", TASKS)
    score, best = sel.update(metrics(0.0, 1.0), step=1)  # mIoU 0 cannot be a reference: wait
    assert math.isnan(score) and not best and sel.best_step is None
    assert sel.update(metrics(20.0, 1.0), step=2) == (0.0, True)
    score, best = sel.update(metrics(30.0, 0.5), step=3)  # +50 % and +50 %
    assert score == pytest.approx(50.0) and best and sel.best_step == 3
    assert sel.update(metrics(25.0, 1.0), step=4)[1] is False


def test_named_metric_direction_and_nan_is_never_best():
    sel = Selector("depth.rmse", TASKS)
    assert sel.update(metrics(1, float("nan")), step=10) == (pytest.approx(float("nan"), nan_ok=True), False)
    assert sel.update(metrics(1, 0.8), step=20)[1] and sel.update(metrics(1, 0.6), step=30)[1]
    assert not sel.update(metrics(1, 0.7), step=40)[1] and sel.best_step == 30
    with pytest.raises(SelectionError, match="no metric 'mIoUU'"):
        Selector("semseg.mIoUU", TASKS)
    with pytest.raises(SelectionError, match="delta_m"):
        Selector("normals.mean", TASKS)


def test_state_round_trip():
    sel = Selector("delta_m", TASKS)
    sel.update(metrics(20.0, 1.0), step=2)
    other = Selector("delta_m", TASKS)
    other.load_state_dict(sel.state_dict())
    assert other.update(metrics(30.0, 0.5), step=3)[0] == pytest.approx(50.0)
