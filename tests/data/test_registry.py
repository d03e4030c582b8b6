"""The dataset registry: names to classes, unknown names refused with a suggestion, class facts
available without loading anything."""

import pytest

from mtvision.config import ConfigError, DataConfig, ExperimentConfig, from_dict
from mtvision.data.nyud import NYUDv2
from mtvision.data.registry import DATASETS, get_dataset, make_dataset, register_dataset
from mtvision.data.synthetic import SyntheticScenes
from mtvision.errors import UnknownNameError


def test_names_map_to_their_classes_and_class_counts_need_no_files():
    assert {"synthetic", "nyud", "pascal"} <= set(DATASETS)
    assert get_dataset("nyud") is NYUDv2 and get_dataset("nyud").num_classes == {"semseg": 40}


def test_an_unknown_dataset_is_an_error_with_a_suggestion_not_a_fallback():
    with pytest.raises(UnknownNameError, match="did you mean 'pascal'"):
        get_dataset("pascl")
    with pytest.raises(ConfigError, match="data.dataset 'nyu' is unknown; did you mean 'nyud'"):
        from_dict(ExperimentConfig, {"data": {"dataset": "nyu", "root": "/x"}, "train": {"iterations": 1}})


def test_make_dataset_builds_each_split_with_its_own_seed():
    cfg = DataConfig(num_samples={"train": 3, "val": 2, "test": 2}, height=16, width=16, seed=4)
    train, val = make_dataset(cfg, "train"), make_dataset(cfg, "val")
    assert isinstance(train, SyntheticScenes) and (len(train), len(val)) == (3, 2)
    assert (train.seed, val.seed) == (4000, 4001)


def test_register_refuses_to_replace_a_name():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("nyud", SyntheticScenes)
    register_dataset("nyud", NYUDv2)  # the same class again is fine
