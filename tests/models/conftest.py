"""Tiny backbones of each family, and a small synthetic batch, for the model tests."""

from __future__ import annotations

import pytest
import torch

# family -> (timm name, timm kwargs): small enough for 2 CPU cores, any input size
TINY_BACKBONES: dict[str, tuple[str, dict]] = {
    "resnet": ("test_resnet", {}),
    "convnext": ("test_convnext", {}),
    "efficientnet": ("test_efficientnet", {}),
    "mobilenet": ("mobilenetv3_small_050", {}),
    "vit": ("test_vit", {"img_size": 64, "dynamic_img_size": True}),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {
            "img_size": 64,
            "depths": (1, 1, 1, 1),
            "embed_dim": 16,
            "num_heads": (1, 1, 2, 2),
            "window_size": 4,
            "dynamic_img_size": True,
        },
    ),
}


@pytest.fixture(params=sorted(TINY_BACKBONES))
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_backbone(family) -> dict:
    """Backbone config section for a tiny model of `family`."""
    name, kwargs = TINY_BACKBONES[family]
    return {"name": name, "kwargs": dict(kwargs)}


@pytest.fixture(scope="session")
def synthetic_batch() -> dict[str, torch.Tensor]:
    """Six 64 x 80 synthetic scenes with semseg, depth, normals, edge and saliency targets."""
    from mtvision.data.synthetic import SyntheticScenes

    ds = SyntheticScenes(6, 64, 80, seed=0)
    items = [ds[i] for i in range(len(ds))]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "meta"}
    batch["num_classes"] = SyntheticScenes.num_classes["semseg"]
    return batch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP
    threads that wait for each other can make a step 100x slower; restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
