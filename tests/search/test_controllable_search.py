"""The width search: constraints (FLOPs budget, task preference) -> a controllable sub-network."""

from __future__ import annotations

import itertools

import pytest
import torch

from mtvision.models import create_model
from mtvision.models.backbones import create_backbone
from mtvision.models.decoders.controllable import WidthConfig
from mtvision.models.heads import MultiScaleNeck, TaskHead
from mtvision.search.controllable import (
    PreferenceError,
    WidthBudgetError,
    WidthFlops,
    decoder_widths,
    expresses,
    measure_widths,
    normalise_preference,
    ordered_pairs,
    path_score,
    search_widths,
)
from mtvision.search.flops import BudgetError, count_flops

W = (0.5, 1.0)
DEC = {(0.5, 0.5): 5.0, (0.5, 1.0): 20.0, (1.0, 0.5): 6.0, (1.0, 1.0): 24.0}
HAND = WidthFlops((8, 8), W, {0.5: 10.0, 1.0: 40.0}, {"a": dict(DEC), "b": dict(DEC)})


def test_hand_table_costs():
    assert HAND.flops(WidthConfig(0.5, {"a": 1.0, "b": 0.5})) == 10 + 20 + 5
    assert HAND.flops(HAND.narrowest()) == 20 and HAND.flops(HAND.widest()) == 88


@pytest.mark.parametrize(("budget", "expected"), [
    # a preferred 3:1.  Expressive candidates (a's decoder wider than b's): (0.5 | 1, 0.5) costs 35,
    # (1 | 1, 0.5) 70; the narrowest (20) is the fallback when neither fits
    (20.0, WidthConfig(0.5, {"a": 0.5, "b": 0.5})),
    (34.9, WidthConfig(0.5, {"a": 0.5, "b": 0.5})),
    (60.0, WidthConfig(0.5, {"a": 1.0, "b": 0.5})),
    (70.0, WidthConfig(1.0, {"a": 1.0, "b": 0.5})),
    (1000.0, WidthConfig(1.0, {"a": 1.0, "b": 0.5})),
])
def test_search_by_hand(budget, expected):
    choice = search_widths(HAND, budget, {"a": 3, "b": 1})
    assert choice.config == expected
    assert choice.flops == HAND.flops(expected) <= budget
    assert choice.preference == {"a": 0.75, "b": 0.25}


def test_equal_preference_uses_the_budget_on_the_encoder_first():
    # equal weights: (1 | 0.5, 0.5) costs 52 and scores 40 + 6 = 46 > (0.5 | 1, 1) at 50 (score 30)
    assert search_widths(HAND, 55.0).config == WidthConfig(1.0, {"a": 0.5, "b": 0.5})
    assert search_widths(HAND, 88.0).config == HAND.widest()


def test_decoder_widths_follow_the_preference():
    widths = (0.25, 0.5, 0.75, 1.0)
    pref = {"semseg": 0.5, "depth": 0.25, "edge": 0.25 * 0.5, "normals": 0.125}
    assert decoder_widths(pref, widths, 1.0) == {"semseg": 1.0, "depth": 0.5, "edge": 0.25, "normals": 0.25}
    assert decoder_widths(pref, widths, 0.5) == {"semseg": 0.5, "depth": 0.25, "edge": 0.25, "normals": 0.25}
    assert decoder_widths(pref, widths, 2.0) == {"semseg": 1.0, "depth": 1.0, "edge": 0.5, "normals": 0.5}
    assert decoder_widths(pref, widths, 4.0) == {"semseg": 1.0, "depth": 1.0, "edge": 1.0, "normals": 1.0}
    assert expresses(WidthConfig(1.0, {"a": 1.0, "b": 0.5}), {"a": 0.6, "b": 0.4})
    assert not expresses(WidthConfig(1.0, {"a": 0.5, "b": 0.5}), {"a": 0.6, "b": 0.4})
    three = {"a": 0.5, "b": 0.3, "c": 0.2}
    assert ordered_pairs(WidthConfig(1.0, {"a": 1.0, "b": 1.0, "c": 0.5}), three) == 2  # a>c, b>c; not a>b
    assert expresses(WidthConfig(1.0, {"a": 1.0, "b": 0.75, "c": 0.5}), three)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(backbone="test_resnet", decoder="controllable", tasks={"semseg": 5, "depth": None, "normals": None},
                        decoder_options={"neck_channels": 16, "head_channels": 8}).eval()


@pytest.fixture(scope="module")
def table(model):
    return measure_widths(model, (32, 40))


def test_measured_full_widths_equal_the_plain_networks(table):
    """Width 1.0 costs what the unslimmed backbone and an HPS-style neck + head cost."""
    x = torch.zeros(1, 3, 32, 40)
    plain = create_backbone("test_resnet").eval()
    with torch.no_grad():
        assert table.encoder[1.0] == count_flops(plain, x)
        feats = plain(x)
        neck = MultiScaleNeck(plain.channels, plain.strides, 16).eval()
        head = TaskHead(16, 5, 8).eval()
        assert table.decoders["semseg"][(1.0, 1.0)] == count_flops(lambda: head(neck(feats)))
    costs = [table.encoder[w] for w in table.widths]
    assert costs == sorted(costs) and costs[0] < costs[-1] / 8  # ~quadratic in the width
    for t in table.tasks:  # a decoder's cost grows with its own width and with the encoder's
        for (e1, d1), (e2, d2) in itertools.product(table.decoders[t], repeat=2):
            if e1 <= e2 and d1 <= d2:
                assert table.decoders[t][(e1, d1)] <= table.decoders[t][(e2, d2)]


def test_search_respects_the_budget_and_favours_the_preferred_task(table):
    low, high = table.flops(table.narrowest()), table.flops(table.widest())
    budgets = [low + (high - low) * k / 12 for k in range(13)]
    rng = torch.Generator().manual_seed(0)
    for pref_values in [torch.rand(3, generator=rng).tolist() for _ in range(6)] + [[3.0, 1.0, 1.0], [0.0, 1.0, 0.0]]:
        pref = dict(zip(table.tasks, pref_values))
        scores = []
        for b in budgets:
            choice = search_widths(table, b, pref)
            assert choice.flops <= b
            p = choice.preference
            for s, t in itertools.permutations(table.tasks, 2):
                if p[s] > p[t]:  # a more preferred task never gets the narrower decoder
                    assert choice.config.decoders[s] >= choice.config.decoders[t]
            scores.append((ordered_pairs(choice.config, p), path_score(table, choice.config, p)))
        assert scores == sorted(scores)  # a larger budget never gives a worse candidate
    # semseg preferred 3:1:1 at a middle budget: the wider decoder, and the budget mostly used
    mid = (low + high) / 2
    choice = search_widths(table, mid, {"semseg": 3, "depth": 1, "normals": 1})
    d = choice.config.decoders
    assert d["semseg"] > d["depth"] and d["semseg"] > d["normals"]
    assert choice.flops > 0.6 * mid
    assert search_widths(table, high).config == table.widest()


def test_budget_below_the_smallest_sub_network_is_a_clear_error(table):
    low = table.flops(table.narrowest())
    with pytest.raises(WidthBudgetError, match="below the smallest sub-network") as info:
        search_widths(table, low * 0.99)
    assert "encoder x0.25" in str(info.value) and "32x40" in str(info.value)
    assert isinstance(info.value, BudgetError) and isinstance(info.value, ValueError)
    assert search_widths(table, low).config == table.narrowest()
    for bad in (0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(WidthBudgetError, match="positive"):
            search_widths(table, bad)


def test_bad_preferences_are_clear_errors():
    tasks = ["semseg", "depth"]
    with pytest.raises(PreferenceError, match="unknown task in the preference 'semseq'; did you mean 'semseg'"):
        normalise_preference({"semseq": 1.0}, tasks)
    with pytest.raises(PreferenceError, match=">= 0"):
        normalise_preference({"semseg": -1.0}, tasks)
    with pytest.raises(PreferenceError, match="at least one positive"):
        normalise_preference({"semseg": 0.0}, tasks)
    with pytest.raises(PreferenceError, match="must be a number"):
        normalise_preference({"semseg": "high"}, tasks)
    assert normalise_preference({"depth": 2}, tasks) == {"semseg": 0.0, "depth": 1.0}
    assert normalise_preference(None, tasks) == {"semseg": 0.5, "depth": 0.5}


def test_non_controllable_model_is_refused():
    hps = create_model(backbone="test_resnet", tasks={"depth": None}, decoder_options={"neck_channels": 8, "head_channels": 8})
    with pytest.raises(PreferenceError, match="needs a controllable model"):
        measure_widths(hps, (32, 32))
