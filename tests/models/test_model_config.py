"""Model configs (YAML in, JSON round trip, strict keys), the decoder registry and create_model."""

from __future__ import annotations

import json

import pytest
import torch

import mtvision
from mtvision.errors import UnknownNameError
from mtvision.models import ConfigError, ModelConfig, create_model, get_decoder, list_models, register_decoder
from mtvision.models.decoders import HPSDecoder

YAML = """
backbone:
  name: test_resnet
  out_indices: [1, 2, 3]
  drop_path_rate: 0.0
decoder: hps
decoder_options: {neck_channels: 16, head_channels: 8}
tasks: {semseg: 13, depth: null}
preprocess:
  mode: letterbox
  input_size: [64, 96]
"""


def test_yaml_config_builds_the_described_model(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(YAML)
    config = ModelConfig.from_yaml(path)
    assert config.backbone.out_indices == [1, 2, 3]
    assert config.tasks == {"semseg": 13, "depth": None}
    assert config.preprocess.input_size == [64, 96]
    model = create_model(path)
    assert model.decoder.backbone.strides == [4, 8, 16]
    assert model.decoder.neck.channels == 16
    out = model(torch.randn(1, 3, 32, 48)).predictions
    assert out["semseg"].shape == (1, 13, 32, 48)


def test_config_round_trips_through_json():
    config = ModelConfig.from_dict(
        {
            "backbone": {"name": "test_vit", "kwargs": {"img_size": 64, "dynamic_img_size": True}},
            "decoder": "cross_stitch",
            "decoder_options": {"alpha_self": 0.8},
            "tasks": {"normals": None, "semseg": 21},
        }
    )
    again = ModelConfig.from_json(config.to_json())
    assert again == config
    assert list(again.tasks) == ["normals", "semseg"]  # task order is kept (it orders cross-stitch columns)
    assert json.loads(config.to_json())["backbone"]["kwargs"] == {"img_size": 64, "dynamic_img_size": True}


@pytest.mark.parametrize(
    "data, match",
    [
        ({"backbone": {"name": "x", "wieghts": "a"}, "tasks": {"depth": None}}, "did you mean 'backbone.weights'"),
        ({"decodr": "hps", "tasks": {"depth": None}}, "did you mean 'decoder'"),
        (
            {"tasks": {"depth": None}, "preprocess": {"mode": "letterbx", "input_size": [8, 8]}},
            "did you mean 'letterbox'",
        ),
        ({"tasks": {"depth": None}, "preprocess": {"mode": "stretch"}}, "needs preprocess.input_size"),
        ({"tasks": {}}, "at least one task"),
        ({"tasks": {"semseg": "many"}}, "tasks.semseg"),
        ({"tasks": {"depth": None}, "backbone": {"channels_last": "yes"}}, "backbone.channels_last"),
    ],
)
def test_bad_configs_are_clear_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(data)


def test_unknown_task_in_config_suggests():
    with pytest.raises(UnknownNameError, match="did you mean 'normals'"):
        ModelConfig.from_dict({"tasks": {"normal": None}})


def test_registry_lists_and_suggests_decoders():
    assert {"hps", "cross_stitch"} <= set(list_models())
    assert mtvision.list_models() == list_models()
    assert get_decoder("hps") is HPSDecoder
    with pytest.raises(UnknownNameError, match="did you mean 'cross_stitch'"):
        create_model(backbone="test_resnet", decoder="crossstitch", tasks=["depth"])
    with pytest.raises(ValueError, match="already registered"):
        register_decoder("hps", lambda make_backbone, tasks: None)


def test_unknown_decoder_option_suggests():
    with pytest.raises(ConfigError, match="did you mean 'decoder_options.neck_channels'"):
        create_model(backbone="test_resnet", tasks=["depth"], decoder_options={"neck_channel": 8})


def test_create_model_keyword_shortcuts_and_defaults():
    model = mtvision.create_model(backbone="test_resnet", tasks=["semseg", "depth"])
    assert model.task_names == ["semseg", "depth"]
    assert model.config.tasks == {"semseg": 40, "depth": None}  # resolved registry default recorded
    assert model.config.decoder == "hps"
    assert model.tasks["semseg"].out_channels == 40


def test_unknown_backbone_in_config_suggests():
    with pytest.raises(UnknownNameError, match="did you mean 'resnet18"):
        create_model(backbone="resnet18x", tasks=["depth"])


def test_create_model_takes_backbone_options_as_keywords():
    from mtvision.models.backbones import BackboneError

    model = create_model(backbone="test_resnet", out_indices=[2, 3], tasks=["depth"])
    assert model.config.backbone.out_indices == [2, 3] and len(model.decoder.backbone.strides) == 2
    with pytest.raises(BackboneError, match="backbone.weights"):  # the real option, not 'preprocess'
        create_model(backbone="test_resnet", pretrained=True, weights="/nonexistent.safetensors", tasks=["depth"])
