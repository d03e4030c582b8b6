"""Dataset registry: a name (the config's `data.dataset`) -> its dataset class.

Each class builds itself from a data config with `from_config(cfg, split, transform)` and declares
its class counts (`num_classes`) and boundary tolerance as class attributes, so nothing needs to
be loaded to know them.
"""

from __future__ import annotations

from typing import Any

from mtvision.data.base import MultiTaskDataset
from mtvision.data.nyud import NYUDv2
from mtvision.data.nyuv2_13 import NYUv2MTAN
from mtvision.data.pascal import PascalContext
from mtvision.data.synthetic import SyntheticScenes
from mtvision.errors import unknown_name

DATASETS: dict[str, type[MultiTaskDataset]] = {
    "synthetic": SyntheticScenes,
    "nyud": NYUDv2,
    "nyuv2_13": NYUv2MTAN,
    "pascal": PascalContext,
}


def register_dataset(name: str, cls: type[MultiTaskDataset]) -> None:
    """Make `cls` available to configs as `data.dataset: name`."""
    if name in DATASETS and DATASETS[name] is not cls:
        raise ValueError(f"dataset {name!r} is already registered")
    DATASETS[name] = cls


def get_dataset(name: str) -> type[MultiTaskDataset]:
    """The dataset class registered as `name` (UnknownNameError with a suggestion otherwise)."""
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    return DATASETS[name]


def make_dataset(cfg: Any, split: str, transform: Any = None) -> MultiTaskDataset:
    """The dataset of `split` that the data config `cfg` (a `DataConfig`) names, with `transform`
    (None: raw samples), assuming `cfg.assumed_hfov` for samples without intrinsics when set."""
    dataset = get_dataset(cfg.dataset).from_config(cfg, split, transform)
    hfov = getattr(cfg, "assumed_hfov", None)
    if hfov is not None:
        dataset.assumed_hfov = float(hfov)
    return dataset
