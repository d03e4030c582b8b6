"""Predictor with a compute budget and a task preference: the chosen sub-network runs, no retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtvision
from mtvision.inference import Predictor
from mtvision.models import create_model
from mtvision.models.decoders.controllable import use_config
from mtvision.search.controllable import PreferenceError, WidthBudgetError

TASKS = {"semseg": 5, "depth": None, "normals": None}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model(backbone="test_resnet", decoder="controllable", tasks=TASKS,
                         decoder_options={"neck_channels": 16, "head_channels": 8})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("controllable")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def predictor(model_dir) -> Predictor:
    return mtvision.load(model_dir)


def _image(h=64, w=96, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _by_hand(model, image, config):
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = torch.from_numpy(((image / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1))[None]
    with torch.no_grad(), use_config(config):
        return model(x).predictions


def test_budget_and_preference_run_the_chosen_widths(model_dir, predictor):
    image = _image()  # 64 x 96: a multiple of 32, so no padding
    full = predictor.select_widths(input_size=(64, 96)).flops  # no budget: the widest sub-network
    budget = 0.4 * full / 1e9
    choice = predictor.select_widths(budget=budget, preference={"semseg": 3, "depth": 1}, input_size=(64, 96))
    assert choice.flops <= 0.4 * full
    assert choice.config.decoders["semseg"] > choice.config.decoders["depth"]
    out = predictor.predict(image, budget=budget, preference={"semseg": 3, "depth": 1})
    raw = _by_hand(mtvision.models.load_model(model_dir), image, choice.config)
    assert np.array_equal(out["semseg"], raw["semseg"].argmax(1)[0].numpy())
    np.testing.assert_allclose(out["depth"], raw["depth"].clamp_min(0)[0, 0].numpy(), atol=1e-5)
    widest = predictor.predict(image)
    assert not np.allclose(widest["depth"], out["depth"])  # another network ran


def test_predict_torch_and_lists_follow_the_same_choice(predictor):
    image = _image(seed=1)
    budget = predictor.select_widths(input_size=(64, 96)).flops * 0.5 / 1e9
    one = predictor.predict(image, budget=budget, preference={"normals": 1})
    many = predictor.predict([image, image], budget=budget, preference={"normals": 1})
    np.testing.assert_allclose(many[1]["normals"], one["normals"], atol=1e-5)
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    t = predictor.predict_torch(tensor, budget=budget, preference={"normals": 1})
    np.testing.assert_allclose(t["depth"][0].numpy(), one["depth"], atol=1e-5)


def test_no_budget_is_the_widest_sub_network(predictor):
    image = _image(seed=2)
    np.testing.assert_allclose(predictor.predict(image, preference={"semseg": 1, "depth": 1, "normals": 1})["depth"],
                               predictor.predict(image)["depth"], atol=0)


def test_bad_constraints_are_clear_errors(predictor):
    image = _image()
    with pytest.raises(WidthBudgetError, match="below the smallest sub-network"):
        predictor.predict(image, budget=1e-6)
    with pytest.raises(PreferenceError, match="unknown task in the preference 'parts'"):
        predictor.predict(image, preference={"parts": 1.0})
    with pytest.raises(WidthBudgetError, match="positive number of GFLOPs"):
        predictor.predict(image, budget=-1)
    with pytest.raises(ValueError, match="needs input_size"):
        predictor.select_widths(budget=1.0)  # pad mode: no fixed input size


def test_plain_models_refuse_a_budget():
    model = create_model(backbone="test_resnet", tasks={"depth": None}, decoder_options={"neck_channels": 8, "head_channels": 8})
    with pytest.raises(PreferenceError, match="needs a controllable model"):
        Predictor(model).predict(_image(), budget=1.0)
