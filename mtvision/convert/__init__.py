"""Released checkpoints -> mtvision pretrained folders (`mtv-convert`).

`FORMATS` maps a format name to its converter (see `mtvision/convert/base.py` for the contract);
`convert_checkpoint(format, checkpoint, dataset, out)` writes the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from mtvision.convert.base import (
    Conversion,
    ConversionError,
    Converter,
    check_dataset,
    load_into_model,
    read_release_checkpoint,
)
from mtvision.convert.invpt import convert_invpt
from mtvision.convert.m3vit import convert_m3vit
from mtvision.convert.mtinet import convert_mtinet
from mtvision.convert.mtmamba import convert_mtmamba, convert_mtmamba_plus
from mtvision.convert.padnet import convert_padnet
from mtvision.convert.taskprompter import convert_taskprompter
from mtvision.errors import unknown_name

FORMATS: dict[str, Converter] = {
    "padnet": convert_padnet,
    "invpt": convert_invpt,
    "taskprompter": convert_taskprompter,
    "mtinet": convert_mtinet,
    "m3vit": convert_m3vit,
    "mtmamba": convert_mtmamba,
    "mtmamba_plus": convert_mtmamba_plus,
}


def convert_checkpoint(
    format: str,
    checkpoint: str | os.PathLike,
    dataset: str,
    out: str | os.PathLike,
    input_size: tuple[int, int] | None = None,
    backbone: str | None = None,
) -> Path:
    """Convert the released `checkpoint` of model `format` trained on `dataset` into the pretrained
    folder `out`; `input_size` (H, W) for size-tied weights (ViT position embeddings), `backbone`
    to name the timm backbone instead of inferring it from the tensor shapes."""
    if format not in FORMATS:
        raise unknown_name("checkpoint format", format, FORMATS)
    check_dataset(dataset)
    state = read_release_checkpoint(checkpoint)
    conversion = FORMATS[format](state, dataset, input_size, backbone)
    model = load_into_model(conversion)
    model.save_pretrained(out)
    return Path(out)


__all__ = ["FORMATS", "Conversion", "ConversionError", "convert_checkpoint"]
