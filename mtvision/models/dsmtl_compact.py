"""Turning a searched DSMTL model (`search: true`, mtvision/models/decoders/dsmtl.py) into its
compact form: only the private backbone stages the search chose, with the same weights."""

from __future__ import annotations

import os

from torch import nn

from mtvision.models.config import ModelConfig
from mtvision.models.decoders.dsmtl import DSMTLDecoder, _dsmtl, derive_private_stages
from mtvision.models.pretrained import load_model
from mtvision.models.registry import build_model

__all__ = ["compact_model", "derive_private_stages", "write_compact"]


def compact_model(model: nn.Module) -> nn.Module:
    """The compact `MultiTaskModel` a searched DSMTL model chose: only the chosen private copies,
    the same weights, no search choices; its eval outputs equal the searched model's."""
    decoder = _dsmtl(model)
    config = model.config.to_dict()
    options = dict(config["decoder_options"])
    for key in ("search", "search_tau", "search_init", "private_cost", *DSMTLDecoder.INIT_OPTIONS):
        options.pop(key, None)
    options["private_stages"] = derive_private_stages(decoder)
    config["decoder_options"] = options
    config["backbone"] = {**config["backbone"], "weights": None, "pretrained": False}
    compact = build_model(ModelConfig.from_dict(config))
    state = {k: v for k, v in model.state_dict().items() if k in compact.state_dict()}
    compact.load_state_dict(state, strict=True)
    return compact.train(model.training)


def write_compact(search_folder: str | os.PathLike, out_folder: str | os.PathLike) -> dict[str, list[int]]:
    """Load a searched DSMTL pretrained folder, prune it (`compact_model`) and save the compact model
    as the pretrained folder `out_folder`; returns the private stages kept per task."""
    model = load_model(search_folder)
    compact = compact_model(model)
    compact.save_pretrained(out_folder)
    return derive_private_stages(compact)
