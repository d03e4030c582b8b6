"""Tests of the strict config system: files with bases, overrides, typed conversion, round trips."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from mtvision.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    OptimConfig,
    TrainConfig,
    UnknownKeyError,
    config_to_dict,
    from_dict,
    load_config,
    save_config,
)
from mtvision.errors import MTVisionError, UnknownNameError
from mtvision.models.config import ModelConfig


@dataclass
class Inner:
    lr: float = 0.1
    steps: int = 3


@dataclass
class Sample:
    """A config that uses every supported annotation (string annotations via __future__)."""

    name: str
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    maybe: Optional[int] = None  # noqa: UP045 - Optional[...] must be supported too
    either: int | None = 5
    items: list[int] = field(default_factory=list)
    pair: tuple[float, float] = (0.0, 1.0)
    many: tuple[str, ...] = ()
    table: dict[str, float] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    inners: dict[str, Inner] = field(default_factory=dict)


@dataclass
class Validated:
    low: int = 0
    high: int = 1

    def validate(self) -> None:
        if self.low > self.high:
            raise ConfigError("low must not exceed high")


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def minimal(**train) -> dict:
    return {"train": {"iterations": 10, **train}}


# ---------------------------------------------------------------------------------------------- from_dict


def test_from_dict_converts_every_supported_annotation():
    cfg = from_dict(
        Sample,
        {
            "name": "x",
            "flag": True,
            "mode": "b",
            "maybe": 4,
            "either": None,
            "items": [1, 2],
            "pair": [1, 2.5],
            "many": ["p", "q", "r"],
            "table": {"semseg": 1, "depth": "1e-3"},
            "inner": {"lr": 2},
            "inners": {"k": {"steps": 7}},
        },
    )
    assert cfg == Sample(
        name="x",
        flag=True,
        mode="b",
        maybe=4,
        either=None,
        items=[1, 2],
        pair=(1.0, 2.5),
        many=("p", "q", "r"),
        table={"semseg": 1.0, "depth": 1e-3},
        inner=Inner(lr=2.0, steps=3),
        inners={"k": Inner(lr=0.1, steps=7)},
    )
    assert isinstance(cfg.pair, tuple) and isinstance(cfg.inner.lr, float) and isinstance(cfg.table["semseg"], float)


def test_unknown_key_names_the_dotted_key_and_the_closest():
    with pytest.raises(UnknownKeyError, match=r"unknown key 'inner\.lrr'; did you mean 'inner\.lr'\?"):
        from_dict(Sample, {"name": "x", "inner": {"lrr": 1.0}})
    with pytest.raises(UnknownKeyError, match=r"unknown key 'inners\.k\.step'; did you mean 'inners\.k\.steps'\?"):
        from_dict(Sample, {"name": "x", "inners": {"k": {"step": 1}}})
    with pytest.raises(UnknownNameError):  # one family with the registries' errors
        from_dict(Sample, {"name": "x", "zzzzz": 1})


def test_prefix_is_used_in_messages():
    with pytest.raises(UnknownKeyError, match=r"'model\.inner\.lrr'; did you mean 'model\.inner\.lr'"):
        from_dict(Sample, {"name": "x", "inner": {"lrr": 1}}, prefix="model")


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"flag": "yes"}, r"'flag': expected bool, got 'yes'"),
        ({"flag": 1}, r"'flag': expected bool, got 1"),
        ({"inner": {"steps": 1.5}}, r"'inner\.steps': expected int, got 1\.5"),
        ({"inner": {"steps": True}}, r"'inner\.steps': expected int, got True"),
        ({"inner": {"lr": "fast"}}, r"'inner\.lr': expected float, got 'fast'"),
        ({"inner": {"lr": False}}, r"'inner\.lr': expected float, got False"),
        ({"name": 3}, r"'name': expected str, got 3"),
        ({"maybe": "x"}, r"'maybe': expected int \| null, got 'x'"),
        ({"items": [1, "two"]}, r"'items\[1\]': expected int, got 'two'"),
        ({"items": 3}, r"'items': expected list\[int\], got 3"),
        ({"pair": [1.0]}, r"'pair': expected 2 items"),
        ({"table": {"a": "b"}}, r"'table\.a': expected float, got 'b'"),
        ({"table": [1]}, r"'table': expected dict\[str, float\]"),
        ({"inner": 5}, r"'inner': expected a mapping for Inner, got 5"),
    ],
)
def test_wrong_types_name_key_expected_type_and_value(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(Sample, {"name": "x", **data})


def test_literal_lists_allowed_values_and_suggests():
    with pytest.raises(ConfigError, match=r"'mode': 'bb' is not one of 'a', 'b'; did you mean 'b'\?"):
        from_dict(Sample, {"name": "x", "mode": "bb"})
    with pytest.raises(ConfigError, match=r"'train\.amp': 'fp32' is not one of 'none', 'bf16', 'fp16'"):
        from_dict(ExperimentConfig, {"train": {"iterations": 1, "amp": "fp32"}})


def test_missing_required_fields_are_named():
    with pytest.raises(ConfigError, match=r"missing required config key\(s\): 'name'"):
        from_dict(Sample, {"flag": True})


def test_from_dict_calls_validate():
    assert from_dict(Validated, {"low": 1, "high": 2}) == Validated(1, 2)
    with pytest.raises(ConfigError, match="low must not exceed high"):
        from_dict(Validated, {"low": 3})


def test_errors_are_mtvision_errors():
    with pytest.raises(MTVisionError):
        from_dict(Sample, {"name": 1})
    with pytest.raises(ValueError):
        from_dict(Sample, {"name": 1})


# ---------------------------------------------------------------------------------------------- run configs


def test_experiment_defaults_and_exactly_one_length():
    cfg = from_dict(ExperimentConfig, minimal())
    assert cfg.train.iterations == 10 and cfg.train.epochs is None
    assert cfg.optim == OptimConfig() and cfg.data == DataConfig()
    with pytest.raises(ConfigError, match="exactly one of train.epochs and train.iterations"):
        from_dict(ExperimentConfig, {})
    with pytest.raises(ConfigError, match="exactly one of train.epochs and train.iterations"):
        from_dict(ExperimentConfig, minimal(epochs=3))


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"optim": {"lr": 0}}, r"optim\.lr must be > 0"),
        ({"optim": {"min_lr": 1.0}}, r"optim\.min_lr"),
        ({"optim": {"grad_clip": -1}}, r"optim\.grad_clip"),
        ({"optim": {"loss_weights": {"semsg": 1.0}}}, r"'semsg', which is not in data\.tasks; did you mean 'semseg'"),
        ({"train": {"iterations": 10, "grad_accum": 0}}, r"train\.grad_accum must be >= 1"),
        ({"train": {"iterations": 0}}, r"train\.epochs/iterations must be >= 1"),
        ({"data": {"dataset": "nyud"}}, r"data\.root is required"),
        ({"data": {"scale_range": [2.0, 0.5]}}, r"data\.scale_range"),
        ({"data": {"num_samples": {"train": 5}}}, r"data\.num_samples needs a size for split\(s\) \['test', 'val'\]"),
        ({"data": {"test_split": "val"}}, r"val_split must differ from data\.test_split"),
        ({"data": {"tasks": ["semseg", "semseg"]}}, r"duplicates"),
        ({"logging": {"log_interval": 0}}, r"logging\.log_interval"),
    ],
)
def test_cross_field_rules(data, pattern):
    merged = {"train": {"iterations": 10}, **data}
    with pytest.raises(ConfigError, match=pattern):
        from_dict(ExperimentConfig, merged)


def test_unknown_task_names_suggest():
    with pytest.raises(UnknownNameError, match=r"data\.tasks: unknown task 'dpeth'; did you mean 'depth'"):
        from_dict(ExperimentConfig, {**minimal(), "data": {"tasks": ["semseg", "dpeth"]}})


def test_holdout_replaces_the_val_split():
    cfg = from_dict(
        ExperimentConfig,
        {**minimal(), "data": {"dataset": "nyud", "root": "/d", "test_split": "val", "holdout_fraction": 0.1}},
    )
    assert cfg.data.holdout_fraction == 0.1 and cfg.data.test_split == "val"


# ---------------------------------------------------------------------------------------------- files


REALISTIC = """
# NYUD-style multi-task run on the synthetic scenes
data:
  dataset: synthetic
  tasks: [semseg, depth, normals, edge]
  height: 96
  width: 128
  scale_range: [0.75, 1.5]
  num_samples: {train: 64, val: 16, test: 16}
optim:
  optimizer: adamw
  lr: 2e-4            # PyYAML reads this as a string; float fields accept it
  betas: [0.9, 0.99]
  schedule: cosine
  warmup_iters: 50
  grad_clip: 1.0
  loss_weights: {semseg: 1.0, depth: 2}
train:
  iterations: 500
  batch_size: 4
  amp: bf16
  channels_last: true
logging:
  console: plain
  wandb_tags: [synthetic, hps]
output_dir: runs/synthetic_hps
model:
  backbone: {name: resnet18}
  decoder: hps
  tasks: {semseg: 13, depth: null, normals: null, edge: null}
"""


def test_realistic_yaml(tmp_path):
    cfg = load_config(ExperimentConfig, write(tmp_path / "exp.yaml", REALISTIC))
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.99) and cfg.optim.schedule == "cosine"
    assert cfg.optim.loss_weights == {"semseg": 1.0, "depth": 2.0}
    assert cfg.data.scale_range == (0.75, 1.5) and cfg.data.num_samples == {"train": 64, "val": 16, "test": 16}
    assert cfg.train.amp == "bf16" and cfg.train.channels_last is True and cfg.train.grad_accum == 1
    assert cfg.logging.wandb_tags == ["synthetic", "hps"]
    assert cfg.model == ModelConfig.from_dict(
        {"backbone": {"name": "resnet18"}, "decoder": "hps", "tasks": {"semseg": 13, "depth": None, "normals": None, "edge": None}}
    )


def test_base_chain_deep_merges_child_wins_lists_replace(tmp_path):
    write(
        tmp_path / "a.yaml",
        {
            "data": {"tasks": ["semseg", "depth", "normals"], "height": 64},
            "optim": {"lr": 0.5},
            "model": {"backbone": {"name": "resnet18", "drop_path_rate": 0.1}},
        },
    )
    write(
        tmp_path / "sub" / "b.yaml",
        {"base": "../a.yaml", "optim": {"lr": 0.25, "momentum": 0.5}, "train": {"epochs": 2}},
    )
    write(tmp_path / "sub" / "c.yaml", {"base": "b.yaml", "data": {"tasks": ["edge"]}, "model": {"backbone": {"drop_path_rate": 0.2}}})
    cfg = load_config(ExperimentConfig, tmp_path / "sub" / "c.yaml")
    assert cfg.data.tasks == ["edge"]  # lists replace
    assert cfg.data.height == 64  # inherited from the grandparent
    assert cfg.optim.lr == 0.25 and cfg.optim.momentum == 0.5  # child wins
    assert cfg.train.epochs == 2
    assert (cfg.model.backbone.name, cfg.model.backbone.drop_path_rate) == ("resnet18", 0.2)  # dicts merge recursively


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="config base cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(ExperimentConfig, tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", {"base": "self.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(ExperimentConfig, tmp_path / "self.yaml")


def test_base_must_be_one_existing_file(tmp_path):
    write(tmp_path / "two.yaml", {"base": ["a.yaml", "b.yaml"]})
    with pytest.raises(ConfigError, match="at most one base per file"):
        load_config(ExperimentConfig, tmp_path / "two.yaml")
    write(tmp_path / "missing.yaml", {"base": "nope.yaml"})
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml \(the base of .*missing\.yaml\)"):
        load_config(ExperimentConfig, tmp_path / "missing.yaml")


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(ExperimentConfig, write(tmp_path / "bad.yaml", "a: [1, 2"))
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(ExperimentConfig, write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ExperimentConfig, tmp_path / "absent.yaml")


def test_unknown_key_from_file_names_file_and_key(tmp_path):
    path = write(tmp_path / "x.yaml", {"train": {"iterations": 1}, "optim": {"lrr": 0.1}})
    with pytest.raises(UnknownKeyError, match=r"x\.yaml: unknown key 'optim\.lrr'; did you mean 'optim\.lr'\?"):
        load_config(ExperimentConfig, path)


def test_overrides_of_nested_list_bool_and_numbers(tmp_path):
    path = write(tmp_path / "x.yaml", REALISTIC)
    cfg = load_config(
        ExperimentConfig,
        path,
        [
            "optim.lr=1e-3",
            "train.amp=fp16",
            "train.compile=true",
            "model.tasks={semseg: 40, depth: null}",
            "model.decoder_options.width=64",
            "data.tasks=[semseg,depth]",
            "logging.wandb_entity=null",
            "optim.grad_clip=null",
            "train.batch_size=2",
        ],
    )
    assert cfg.optim.lr == 1e-3 and cfg.train.amp == "fp16" and cfg.train.compile is True
    assert cfg.model.tasks == {"semseg": 40, "depth": None} and cfg.model.decoder_options == {"width": 64}
    assert cfg.data.tasks == ["semseg", "depth"] and cfg.optim.grad_clip is None and cfg.train.batch_size == 2
    assert cfg.optim.loss_weights == {"semseg": 1.0, "depth": 2.0}  # untouched siblings survive


def test_bad_overrides(tmp_path):
    path = write(tmp_path / "x.yaml", minimal())
    with pytest.raises(UnknownKeyError, match=r"unknown key 'optim\.lrr'; did you mean 'optim\.lr'\?"):
        load_config(ExperimentConfig, path, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'train\.compile': expected bool, got 'maybe'"):
        load_config(ExperimentConfig, path, ["train.compile=maybe"])
    with pytest.raises(ConfigError, match="must look like dotted.key=value"):
        load_config(ExperimentConfig, path, ["optim.lr"])
    with pytest.raises(ConfigError, match="must look like dotted.key=value"):
        load_config(ExperimentConfig, path, ["optim..lr=1"])
    with pytest.raises(ConfigError, match="cannot parse the value"):
        load_config(ExperimentConfig, path, ["data.tasks=[semseg"])
    with pytest.raises(ConfigError, match=r"'train\.iterations' holds 10, not a mapping"):
        load_config(ExperimentConfig, path, ["train.iterations.x=1"])


def test_overrides_apply_in_order(tmp_path):
    path = write(tmp_path / "x.yaml", minimal())
    cfg = load_config(ExperimentConfig, path, ["train.batch_size=3", "train.batch_size=5"])
    assert cfg.train.batch_size == 5


# ---------------------------------------------------------------------------------------------- saving


@pytest.mark.parametrize("name", ["resolved.yaml", "resolved.json"])
def test_save_load_round_trip(tmp_path, name):
    cfg = load_config(ExperimentConfig, write(tmp_path / "exp.yaml", REALISTIC), ["optim.lr=3e-4", "train.seed=7"])
    out = tmp_path / "run" / name
    save_config(cfg, out)
    if name.endswith(".json"):
        assert json.loads(out.read_text())["optim"]["betas"] == [0.9, 0.99]
    else:
        assert yaml.safe_load(out.read_text())["train"]["seed"] == 7
    again = load_config(ExperimentConfig, out)  # a JSON file is valid YAML
    assert again == cfg
    assert not [p for p in out.parent.iterdir() if p.name != name]  # no temporary files left


def test_config_to_dict_is_plain():
    cfg = from_dict(ExperimentConfig, minimal())
    data = config_to_dict(cfg)
    assert data["optim"]["betas"] == [0.9, 0.999] and data["data"]["scale_range"] == [0.5, 2.0]
    assert json.loads(json.dumps(data)) == data
    assert from_dict(ExperimentConfig, data) == cfg
    with pytest.raises(TypeError):
        config_to_dict({"a": 1})


def test_train_config_direct_construction():
    TrainConfig(epochs=1).validate()
    with pytest.raises(ConfigError):
        TrainConfig(epochs=1, iterations=1).validate()


def test_an_assumed_field_of_view_must_be_an_angle_below_180_degrees():
    from mtvision.config import DataConfig

    DataConfig(assumed_hfov=55.0).validate()
    for bad in (0.0, 180.0, -10.0):
        with pytest.raises(ConfigError, match="assumed_hfov"):
            DataConfig(assumed_hfov=bad).validate()


def test_task_losses_name_a_trained_task_and_a_known_variant():
    from mtvision.config import ExperimentConfig

    base = {"data": {"tasks": ["semseg", "normals"]}, "train": {"iterations": 10}}
    cfg = from_dict(ExperimentConfig, {**base, "optim": {"task_losses": {"normals": "l1"}}})
    cfg.validate()
    for losses, pattern in (({"normal": "l1"}, "did you mean 'normals'"), ({"normals": "l3"}, "l3"),
                            ({"semseg": "l1"}, "no loss variants")):
        with pytest.raises(ConfigError, match=pattern):
            from_dict(ExperimentConfig, {**base, "optim": {"task_losses": losses}}).validate()
