"""Write synthetic scenes to disk in the NYUD-v2 layout, and draw a preview grid of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from mtvision import visualize
from mtvision.cv import cv2
from mtvision.data.synthetic import generate

PREVIEW_COLUMNS = ("image", "semseg", "depth", "normals", "edge", "saliency")


def _write_png(path: Path, array: np.ndarray) -> None:
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")


def write_nyud_layout(
    out: str | Path,
    num: int,
    height: int = 128,
    width: int = 160,
    seed: int = 0,
    val_fraction: float = 0.2,
    progress: bool = True,
) -> list[str]:
    """Write `num` scenes under `out` as NYUD-v2 (ATRC/InvPT release) does; returns the ids.

    images/<id>.png, segmentation/<id>.png (class + 1; 0 would be unlabelled), depth/<id>.npy
    (metres), normals/<id>.png (round((n + 1) / 2 * 255)), edge/<id>.png (0 / 255),
    gt_sets/{train,val}.txt (the last `val_fraction` of the ids are val).  Saliency, which NYUD
    does not have, goes to saliency/<id>.png (0 / 255).
    """
    if num < 1:
        raise ValueError(f"num must be positive, got {num}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(out)
    for sub in ("images", "segmentation", "depth", "normals", "edge", "saliency", "gt_sets"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for index in tqdm(range(num), desc="synthetic scenes", unit="scene", disable=not progress):
        sample = generate(seed, index, height, width)
        sid = sample["meta"]["id"]
        ids.append(sid)
        _write_png(root / "images" / f"{sid}.png", sample["image"])
        _write_png(root / "segmentation" / f"{sid}.png", (sample["semseg"].astype(np.uint16) + 1).astype(np.uint8))
        np.save(root / "depth" / f"{sid}.npy", sample["depth"])
        normals = np.round((sample["normals"] + 1.0) * 0.5 * 255.0).clip(0, 255).astype(np.uint8)
        _write_png(root / "normals" / f"{sid}.png", normals)
        _write_png(root / "edge" / f"{sid}.png", (sample["edge"] * 255).astype(np.uint8))
        _write_png(root / "saliency" / f"{sid}.png", (sample["saliency"] * 255).astype(np.uint8))
    num_val = int(round(num * val_fraction))
    split = num - num_val
    (root / "gt_sets" / "train.txt").write_text("".join(f"{i}\n" for i in ids[:split]))
    (root / "gt_sets" / "val.txt").write_text("".join(f"{i}\n" for i in ids[split:]))
    return ids


def preview_grid(seed: int = 0, num: int = 6, height: int = 128, width: int = 160) -> np.ndarray:
    """One row per scene: image | semseg | depth | normals | edge | saliency (H x W x 3 uint8)."""
    rows = []
    for index in range(num):
        sample = generate(seed, index, height, width)
        rows.append(
            [
                sample["image"],
                visualize.colorize_labels(sample["semseg"]),
                visualize.colorize_depth(sample["depth"]),
                visualize.colorize_normals(sample["normals"]),
                visualize.colorize_probability(sample["edge"]),
                visualize.colorize_probability(sample["saliency"]),
            ]
        )
    return visualize.image_grid(rows, titles=list(PREVIEW_COLUMNS))
