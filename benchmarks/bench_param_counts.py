"""Parameter counts of the published-model recipes, built by mtvision at full size, next to the counts
of the authors' releases (their builders, random init, measured outside this repository).

    python benchmarks/bench_param_counts.py

Each recipe's model is built on the meta device (no memory, no weights: `backbone.pretrained=false`).
The release counts include parameters a release builds but never uses in its forward (InvPT's
unused ViT blocks and norms, TaskPrompter's unused prompt rows); mtvision does not build those, and
`mtv-convert` names and skips them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtvision.config import ExperimentConfig
from mtvision.config_io import load_config
from mtvision.data.registry import DATASETS
from mtvision.models.registry import create_model

ROOT = Path(__file__).resolve().parents[1]
# recipe -> (release's count, parameters the release builds but never uses, where the count comes from)
RELEASES = {
    "nyud/invpt_vitl16_448x576.yaml": (402_092_888, 6_639_562, "prismformore/Multi-Task-Transformer InvPT"),
    "pascal/invpt_vitl16_512x512.yaml": (422_929_810, 6_972_202, "prismformore/Multi-Task-Transformer InvPT"),
    "nyud/taskprompter_vitl16_448x576.yaml": (513_505_709, None, "prismformore/Multi-Task-Transformer TaskPrompter"),
    "pascal/taskprompter_vitl16_512x512.yaml": (401_104_864, None, "prismformore/Multi-Task-Transformer TaskPrompter"),
    "pascal/taskprompter_vitb16_512x512.yaml": (418_332_214, None, "prismformore/Multi-Task-Transformer TaskPrompter"),
    "nyud/mtmamba_swinl_448x576.yaml": (None, None, "EnVision-Research/MTMamba"),
    "pascal/mtmamba_swinl_512x512.yaml": (None, None, "EnVision-Research/MTMamba"),
    "nyud/mtmamba_plus_swinl_448x576.yaml": (315_021_249, 0, "EnVision-Research/MTMamba (MTMamba++)"),
    "pascal/mtmamba_plus_swinl_512x512.yaml": (343_231_606, 0, "EnVision-Research/MTMamba (MTMamba++)"),
    "nyud/padnet_hrnet18s_480x640.yaml": (7_019_056, 0, "SimonVandenhende/Multi-Task-Learning-PyTorch"),
    "pascal/padnet_hrnet18s_512x512.yaml": (29_304_992, 0, "SimonVandenhende/Multi-Task-Learning-PyTorch"),
    "nyud/mtinet_hrnet18s_480x640.yaml": (8_578_179, 0, "SimonVandenhende/Multi-Task-Learning-PyTorch"),
    "pascal/mtinet_hrnet18s_512x512.yaml": (24_494_171, 0, "SimonVandenhende/Multi-Task-Learning-PyTorch"),
    "nyud/m3vit_vits16_480x640.yaml": (71_802_148, 0, "VITA-Group/M3ViT"),
    "pascal/m3vit_vits16_512x512.yaml": (103_983_075, 0, "VITA-Group/M3ViT"),
}


def count(recipe: str) -> int:
    cfg = load_config(ExperimentConfig, ROOT / "configs" / recipe, ["model.backbone.pretrained=false", "model.backbone.weights=null"])
    num_classes = dict(DATASETS[cfg.data.dataset].num_classes)
    model_cfg = cfg.model.resolved(cfg.data.tasks, num_classes, (cfg.data.height, cfg.data.width))
    with torch.device("meta"):
        model = create_model(model_cfg)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    print("| recipe | mtvision | release | release, unused removed | source |")
    print("|---|---|---|---|---|")
    for recipe, (release, unused, source) in RELEASES.items():
        ours = count(recipe)
        rel = "n/a" if release is None else f"{release:,}"
        used = "n/a" if release is None or unused is None else f"{release - unused:,}"
        print(f"| {recipe} | {ours:,} | {rel} | {used} | {source} |", flush=True)


if __name__ == "__main__":
    main()
