"""`mtvision.list_models` and `mtv-list`: what a user can build, train and convert."""

from __future__ import annotations

import pytest

import mtvision
from mtvision.cli.list import main
from mtvision.convert import FORMATS
from mtvision.models.registry import DECODERS


def test_list_models_covers_every_kind_and_filters_by_pattern():
    assert mtvision.list_models() == sorted(DECODERS)
    assert mtvision.list_models("*mamba*") == ["mtmamba"]
    assert mtvision.list_models("MAMBA") == ["mtmamba"]  # a substring, case-insensitive
    assert mtvision.list_models(kind="released") == sorted(FORMATS)
    assert "nyud/invpt_vitl16_448x576.yaml" in mtvision.list_models("invpt", kind="configs")
    assert {"vit", "swin", "hrnet", "resnet"} <= set(mtvision.list_models(kind="backbones"))
    everything = mtvision.list_models(kind="all")
    assert "decoders:hps" in everything and "released:invpt" in everything
    assert mtvision.list_models("no-such-model") == []


def test_mtv_list_prints_names_and_descriptions(capsys):
    assert main(["mamba"]) == 0
    out = capsys.readouterr().out
    assert "mtmamba" in out and "decoders" in out and "nyud/mtmamba_swinl_448x576.yaml" in out
    assert main(["--kind", "released", "--names-only"]) == 0
    assert capsys.readouterr().out.split() == sorted(FORMATS)


def test_mtv_list_rejects_an_unknown_kind(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--kind", "nonsense"])
    assert exc.value.code == 2
