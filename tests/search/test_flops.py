"""FLOPs: measured per stage against hand counts, summed over a tree, and budgets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtvision.models import create_model
from mtvision.models.branching_spec import BranchingSpec, SpecError
from mtvision.search.flops import (
    BudgetError,
    FlopsTable,
    cheapest_flops,
    check_budget,
    costliest_flops,
    count_flops,
    format_flops,
    measure,
    spec_flops,
    stage_flops,
)

TASKS = ("semseg", "depth", "normals")


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_stage_flops_match_hand_counts_for_convolutions():
    h, w = 32, 48
    stages = [
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=False), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 6, 1, bias=False)),
    ]
    want = [
        2 * 3 * 8 * 9 * h * w,  # 3x3 conv, C_in=3 -> C_out=8, full resolution
        2 * 8 * 4 * 9 * (h // 2) * (w // 2),  # 3x3 conv, stride 2
        2 * 4 * 6 * 1 * (h // 2) * (w // 2),  # 1x1 conv
    ]
    assert stage_flops(stages, (h, w)) == want
    assert stage_flops(stages[:1], (2 * h, w)) == [2 * want[0]]  # linear in the pixel count


def test_stage_flops_leave_training_state_and_statistics_alone():
    stage = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).train()
    before = stage[1].running_mean.clone()
    stage_flops([stage], (16, 16))
    assert stage.training and stage[1].training
    assert torch.equal(stage[1].running_mean, before)


def test_spec_flops_sum_copies_times_stage_flops_plus_heads():
    table = [10.0, 20.0, 30.0]
    spec = BranchingSpec(
        TASKS, ((TASKS,), (("semseg",), ("depth", "normals")), (("semseg",), ("depth",), ("normals",)))
    )
    assert spec_flops(spec, table) == 10 + 2 * 20 + 3 * 30
    assert spec_flops(spec, table, head_flops=5.0) == 140 + 3 * 5
    assert spec_flops(spec, table, head_flops={"semseg": 1, "depth": 2, "normals": 4}) == 147
    assert spec_flops(spec, FlopsTable((8, 8), tuple(table), {t: 1.0 for t in TASKS})) == 143
    assert cheapest_flops(table, TASKS) == 60 and costliest_flops(table, TASKS, 1.0) == 183
    with pytest.raises(SpecError, match="table has 2 stages but the spec has 3"):
        spec_flops(spec, table[:2])
    with pytest.raises(SpecError, match=r"missing for task\(s\) \['normals'\]"):
        spec_flops(spec, table, head_flops={"semseg": 1, "depth": 2})


def test_budget_below_the_cheapest_tree_is_refused():
    table = [100.0, 200.0]
    check_budget(300.0 + 3 * 7, table, TASKS, head_flops=7.0)  # exactly the all-shared tree
    check_budget(1e9, table, TASKS)
    with pytest.raises(BudgetError, match=r"budget 320 FLOPs is below the cheapest tree \(321 FLOPs.*to 921 FLOPs"):
        check_budget(320.0, table, TASKS, head_flops=7.0)
    with pytest.raises(BudgetError, match="must be positive"):
        check_budget(0.0, table, TASKS)


def test_measured_tree_flops_equal_the_counted_forward():
    torch.manual_seed(0)
    spec = BranchingSpec(
        TASKS,
        ((TASKS,), (TASKS,), (("semseg",), ("depth", "normals")), (("semseg",), ("depth",), ("normals",))),
    )
    model = create_model(
        backbone="test_resnet",
        decoder="branched",
        tasks=list(TASKS),
        decoder_options={"spec": spec.to_dict(), "neck_channels": 16, "head_channels": 8},
    )
    decoder = model.decoder
    table = measure(decoder, (32, 48))
    assert model.training  # measuring does not switch the model to eval
    images = torch.zeros(1, 3, 32, 48)
    with torch.no_grad():
        full = count_flops(decoder, images, list(TASKS))
        depth_only = count_flops(decoder, images, ["depth"])
    assert spec_flops(spec, table) == full
    path = sum(table.stages) + table.heads["depth"]  # one copy per stage on depth's path
    assert depth_only == path
    # the all-shared tree is the cheapest and the separate one the most expensive
    low, high = cheapest_flops(table, TASKS), costliest_flops(table, TASKS)
    assert low < spec_flops(spec, table) < high
    assert high - low == pytest.approx((len(TASKS) - 1) * sum(table.stages))
    with pytest.raises(BudgetError, match="below the cheapest tree"):
        check_budget(0.5 * low, table, TASKS)


def test_format_flops():
    assert format_flops(1.8234e9) == "1.82 GFLOPs"
    assert format_flops(474e6) == "474 MFLOPs"
    assert format_flops(12.0) == "12 FLOPs"
