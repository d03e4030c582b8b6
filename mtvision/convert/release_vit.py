"""What the InvPT and TaskPrompter converters share: the plain ViT/16 inside both releases (its
size inferred from tensor shapes, the input size its position embedding is tied to), the
releases' task lists per dataset, and `KeyMap`, which records every release key it maps or skips.

Both releases build their model for one input size (448x576 NYUD, 512x512 PASCAL): `pos_embed`
holds one row per 16 x 16 patch of that size plus a class-token slot, and the releases never
resample it once the model is built (they resize only the ImageNet weights, when building).  So a
converter takes the size the checkpoint was trained at and refuses one that does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from mtvision.convert.base import RELEASE_TASK_NAMES, ConversionError, take
from mtvision.models.config import BackboneConfig, ModelConfig, PreprocessConfig

PATCH = 16
VIT_SIZES: dict[int, tuple[str, int, int]] = {
    192: ("vit_tiny_patch16_384", 12, 3),
    384: ("vit_small_patch16_384", 12, 6),
    768: ("vit_base_patch16_384", 12, 12),
    1024: ("vit_large_patch16_384", 24, 16),
}
"""ViT width -> (timm name, depth, heads) of ViT-Ti/S/B/L with 16 x 16 patches."""

RELEASE_INPUT_SIZE = {"nyud": (448, 576), "pascal": (512, 512)}
RELEASE_TASKS = {"nyud": ["semseg", "depth", "normals", "edge"], "pascal": ["semseg", "human_parts", "sal", "normals", "edge"]}
"""The releases' task order per dataset (the order of every per-task list and channel block)."""
RELEASE_CLASSES = {"nyud": {"semseg": 40}, "pascal": {"semseg": 21, "human_parts": 7}}

BLOCK_PARAMS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
"""The parameters of a ViT block, named alike in the releases and in timm."""


@dataclass(frozen=True)
class ReleaseViT:
    """The ViT a release checkpoint holds: timm name, width, depth, heads, and the input size and
    patch grid its position embedding fits."""

    name: str
    width: int
    depth: int
    heads: int
    input_size: tuple[int, int]

    @property
    def grid(self) -> tuple[int, int]:
        return (self.input_size[0] // PATCH, self.input_size[1] // PATCH)

    @property
    def taps(self) -> list[int]:
        """0-based indices of the blocks after depth/4, depth/2, 3 depth/4 and depth (the releases' taps)."""
        return [self.depth * k // 4 - 1 for k in (1, 2, 3, 4)]


def _fitting_sizes(patches: int) -> list[str]:
    pairs = [(h, patches // h) for h in range(1, patches + 1) if patches % h == 0]
    near = sorted((p for p in pairs if 0.5 <= p[0] / p[1] <= 2), key=lambda p: abs(p[0] - p[1]))
    return [f"{h * PATCH}x{w * PATCH}" for h, w in near[:4]]


def infer_vit(
    state: Mapping[str, Tensor], prefix: str, dataset: str, input_size: tuple[int, int] | None, backbone: str | None
) -> ReleaseViT:
    """The ViT under `prefix` in a release state dict; `input_size` None means the release's size
    for `dataset`.  ConversionError when the shapes fit no ViT-Ti/S/B/L/16 or the size does not fit
    the position embedding."""
    patch = state.get(f"{prefix}patch_embed.proj.weight")
    if patch is None:
        raise ConversionError(f"the checkpoint has no {prefix}patch_embed.proj.weight: not a ViT checkpoint of this model")
    if patch.ndim != 4 or tuple(patch.shape[1:]) != (3, PATCH, PATCH):
        raise ConversionError(f"patch embedding of shape {tuple(patch.shape)} fits no ViT with 16 x 16 patches")
    width = int(patch.shape[0])
    depth = len({k[len(prefix) + 7 :].split(".")[0] for k in state if k.startswith(f"{prefix}blocks.")})
    if width not in VIT_SIZES or VIT_SIZES[width][1] != depth:
        known = ", ".join(f"width {w} depth {d}" for w, (_, d, _) in VIT_SIZES.items())
        raise ConversionError(f"a ViT of width {width} and depth {depth} fits no known backbone ({known})")
    name, _, heads = VIT_SIZES[width]
    size = tuple(int(v) for v in (input_size or RELEASE_INPUT_SIZE[dataset]))
    if len(size) != 2 or min(size) < PATCH or size[0] % PATCH or size[1] % PATCH:
        raise ConversionError(f"input_size must be (H, W), multiples of {PATCH}, got {input_size}")
    rows = int(take(state, set(), f"{prefix}pos_embed").shape[1])
    want = (size[0] // PATCH) * (size[1] // PATCH) + 1
    if rows != want:
        fits = _fitting_sizes(rows - 1)
        raise ConversionError(
            f"the checkpoint's pos_embed has {rows} rows ({rows - 1} patch positions + the class slot) but an input of "
            f"{size[0]}x{size[1]} needs {want}: give the size it was trained at (input_size / --input-size H W; sizes that "
            f"fit: {', '.join(fits) or 'none'}). The release does not resample a trained model's position embedding, "
            "and neither does the converter."
        )
    return ReleaseViT(backbone or name, width, depth, heads, size)  # a named backbone must still fit the shapes


def release_tasks(state: Mapping[str, Tensor], dataset: str, head_key: str) -> list[str]:
    """The release's task names of `dataset`, checked against the checkpoint's heads
    (`head_key` with `{t}` for the task) and class counts."""
    found = {k for k in state if k.startswith("heads.")}
    names = RELEASE_TASKS[dataset]
    present = [t for t in names if head_key.format(t=t) in state]
    other = sorted({k.split(".")[1] for k in found} - set(names))
    if present != names or other:
        raise ConversionError(
            f"the checkpoint's heads are for tasks {sorted({k.split('.')[1] for k in found})}, the {dataset} release "
            f"has {names}: a checkpoint of another dataset or model?"
        )
    for t, classes in RELEASE_CLASSES[dataset].items():
        got = int(state[head_key.format(t=t)].shape[0])
        if got != classes:
            raise ConversionError(f"the {t} head has {got} classes, the {dataset} release {classes}: a checkpoint of another dataset?")
    return names


def release_preprocess(dataset: str, size: tuple[int, int]) -> PreprocessConfig:
    """Padding as the releases evaluate: bottom/right (the releases centre) up to 448x576 for NYUD's
    425x560 images (a multiple of 64) and to 512x512 for PASCAL at its release size."""
    divisor = 512 if dataset == "pascal" and tuple(size) == (512, 512) else 64
    return PreprocessConfig(mode="pad", input_size=list(size), size_divisor=divisor)


def release_vit_config(
    state: Mapping[str, Tensor], names: list[str], vit: ReleaseViT, dataset: str, decoder: str, options: dict
) -> ModelConfig:
    """The pretrained-folder config of an InvPT-family release: its ViT as the releases feed it (the
    taps after each quarter, drop path 0.15, the final norm on the last tap), the tasks in mtvision's
    names with the class counts of their heads (`heads.<task>.linear_pred`), the releases' padding."""
    if "sal" in names:
        options = {**options, "saliency_channels": int(state["heads.sal.linear_pred.weight"].shape[0])}
    tasks = {mtvision_task(t): (int(state[f"heads.{t}.linear_pred.weight"].shape[0]) if t in ("semseg", "human_parts") else None)
             for t in names}
    return ModelConfig(
        backbone=BackboneConfig(
            name=vit.name, out_indices=vit.taps, drop_path_rate=0.15, output_norm="last", output_norm_eps=1e-6,
            kwargs={"img_size": list(vit.input_size), "dynamic_img_size": True},
        ),
        decoder=decoder,
        decoder_options=options,
        tasks=tasks,
        preprocess=release_preprocess(dataset, vit.input_size),
    )


def mtvision_task(name: str) -> str:
    """A release task name in mtvision's naming."""
    return RELEASE_TASK_NAMES.get(name, name)


class KeyMap:
    """Release keys -> mtvision keys, recording what was used (`used`) and skipped (`skipped`)."""

    def __init__(self, state: Mapping[str, Tensor]):
        self.state = state
        self.used: set[str] = set()
        self.out: dict[str, Tensor] = {}
        self.skipped: dict[str, str] = {}

    def key(self, src: str, dst: str) -> None:
        """One tensor."""
        self.out[dst] = take(self.state, self.used, src)

    def prefix(self, src: str, dst: str) -> None:
        """Every key under the module prefix `src` (with its trailing dot), renamed to `dst`."""
        keys = [k for k in self.state if k.startswith(src)]
        if not keys:
            raise ConversionError(f"the checkpoint has no {src}* keys: is it a checkpoint of this model?")
        for k in keys:
            self.key(k, dst + k[len(src) :])

    def skip(self, src: str, reason: str) -> None:
        """Every key under `src` (a prefix or a full key), skipped on purpose for `reason`."""
        keys = [k for k in self.state if k == src or k.startswith(src)]
        if not keys:
            raise ConversionError(f"the checkpoint has no {src}* keys: is it a checkpoint of this model?")
        for k in keys:
            self.skipped[k] = reason

    def vit_blocks(self, src: str, dst: str, depth: int) -> None:
        """The standard block parameters of `depth` ViT blocks."""
        for b in range(depth):
            for p in BLOCK_PARAMS:
                for leaf in ("weight", "bias"):
                    self.key(f"{src}{b}.{p}.{leaf}", f"{dst}{b}.{p}.{leaf}")
