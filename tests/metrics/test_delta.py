import json

import pytest

from mtvision.metrics.delta import ReferencesError, delta_m, load_references

HIGHER = {"semseg": {"mIoU": True, "pixAcc": True}, "depth": {"rmse": False}}


def test_primary_delta_m_hand_case():
    refs = {"semseg": {"mIoU": 40.0, "pixAcc": 80.0}, "depth": {"rmse": 0.5}}
    res = {"semseg": {"mIoU": 44.0, "pixAcc": 80.0}, "depth": {"rmse": 0.55}}
    # semseg +10 %, depth rmse 10 % worse -> -10 %: average 0
    assert delta_m(res, refs, {"semseg": "mIoU", "depth": "rmse"}, HIGHER) == pytest.approx(0.0)
    res["depth"]["rmse"] = 0.45  # 10 % better
    assert delta_m(res, refs, {"semseg": "mIoU", "depth": "rmse"}, HIGHER) == pytest.approx(10.0)


def test_all_metrics_variant_weights_every_metric_equally():
    refs = {"semseg": {"mIoU": 40.0, "pixAcc": 80.0}, "depth": {"rmse": 0.5}}
    res = {"semseg": {"mIoU": 44.0, "pixAcc": 88.0}, "depth": {"rmse": 0.5}}
    assert delta_m(res, refs, None, HIGHER) == pytest.approx(100 * (0.1 + 0.1 + 0.0) / 3)


def test_missing_reference_and_direction_are_errors():
    with pytest.raises(ReferencesError, match="depth.rmse"):
        delta_m({"depth": {"rmse": 1.0}}, {"depth": {}}, {"depth": "rmse"}, HIGHER)
    with pytest.raises(ReferencesError, match="unknown direction"):
        delta_m({"edge": {"odsF": 1.0}}, {"edge": {"odsF": 2.0}}, {"edge": "odsF"}, HIGHER)


def test_load_references(tmp_path):
    path = tmp_path / "refs.json"
    path.write_text(json.dumps({"semseg": {"mIoU": 40}, "depth": {"rmse": 0.5}}))
    assert load_references(path, ["semseg"]) == {"semseg": {"mIoU": 40.0}, "depth": {"rmse": 0.5}}
    path.write_text(json.dumps({"split": "test", "metrics": {"depth": {"rmse": 0.25}}}))  # mtv-eval output
    assert load_references(path) == {"depth": {"rmse": 0.25}}
    path.write_text(json.dumps({"semseg": {"mIoU": 40}, "depth": {"rmse": 0.5}}))
    with pytest.raises(ReferencesError, match="no entry for task"):
        load_references(path, ["normals"])
    path.write_text("{not json")
    with pytest.raises(ReferencesError, match="not valid JSON"):
        load_references(path)
    with pytest.raises(ReferencesError, match="does not exist"):
        load_references(tmp_path / "missing.json")
