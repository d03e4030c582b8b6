"""Any timm model as a multi-scale feature extractor.

`create_backbone(name, ...)` builds the timm model with `features_only=True` (CNNs through
`FeatureListNet`/their own feature classes, ViTs through `forward_intermediates`, Swin with NHWC
output) and wraps it in a `Backbone` whose `forward(x)` returns a list of NCHW maps with known
`channels` and `strides`.

A `Backbone` can also be run stage by stage (`begin`, `run_stage`, `stage_feature`): stage i ends at
output level i.  Soft-sharing decoders (cross-stitch) interleave several backbones that way.

Pretrained weights come from one of two places (`create_backbone`'s `pretrained` and `weights`):
a local file, loaded through timm's `pretrained_cfg_overlay=dict(file=...)`, never `checkpoint_path=`
(the module names of a features-only model differ from the original's), safetensors read with
safetensors and anything else with `torch.load(weights_only=True)`; or timm's pretrained tag of the
model name (its default tag when the name has none), fetched through the Hugging Face hub cache exactly
as `timm.create_model(name, pretrained=True)` does.  The user's HF_HUB_OFFLINE is respected, never set:
offline, the weights must already be in the hub cache (HF_HUB_CACHE), and a miss is one `BackboneError`
naming both ways out (a local `backbone.weights` file, or filling the cache online).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models._features import FeatureDictNet, FeatureGetterNet
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mtvision.errors import MTVisionError, UnknownNameError, closest
from mtvision.models.segnet import SEGNET_NAME, SegNet
from mtvision.models.swin_mmseg import use_mmseg_windows

_log = logging.getLogger(__name__)

DEFAULT_MIN_STRIDE = 4
OUTPUT_NORMS = ("none", "last", "all")
"""backbone.output_norm: no norm on the returned levels, a LayerNorm on the last one (the final
norm of a ViT, which timm's features_only model drops) or on every level (mmseg's Swin)."""
SWIN_IMPLS = ("timm", "mmseg")
"""backbone.swin_impl: timm's Swin windows, or mmseg's (MTMamba's backbone; `swin_mmseg.py`)."""


UPSAMPLE_MODES = ("nearest", "bilinear")
"""backbone.upsample_mode: the mode set on every nn.Upsample of the model (None keeps timm's)."""


class BackboneError(MTVisionError, ValueError):
    """A backbone cannot be built as asked (weights missing or unreadable, unsupported option)."""


def hub_offline() -> bool:
    """Whether the Hugging Face hub client is in offline mode (the user's HF_HUB_OFFLINE; read, never set)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return True
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    """The Hugging Face hub cache folder in use (HF_HUB_CACHE, else HF_HOME/hub)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"
    return str(constants.HF_HUB_CACHE)


class _MissingKeys(logging.Handler):
    """Collects timm's report of model keys absent from a weights file (timm loads features non-strictly)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Missing keys (") and ")" in message:
            self.keys += message[len("Missing keys (") : message.index(")")].split(", ")

    def non_classifier(self, name: str) -> list[str]:
        """Missing keys other than the classifier's (which timm drops on purpose for features)."""
        classifier = timm.models.get_pretrained_cfg_value(name, "classifier") or ()
        prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
        return [k for k in self.keys if not (prefixes and k.startswith(prefixes))]


@contextlib.contextmanager
def _collect_missing_keys() -> Iterator[_MissingKeys]:
    logger = logging.getLogger("timm.models._builder")
    handler, level = _MissingKeys(), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def check_backbone_name(name: str) -> None:
    """Raise UnknownNameError (with the closest timm name) unless timm knows `name`; refuse hub names."""
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise BackboneError(
            f"backbone {name!r} refers to a remote or packaged model; use the timm architecture name, with a "
            "pretrained tag if you like (e.g. 'resnet18.a1_in1k'), and backbone.pretrained: true for timm's "
            "weights through the hub cache, or backbone.weights for a local file"
        )
    if not timm.is_model(name):
        hint = closest(name, timm.list_models())
        msg = f"unknown backbone {name!r}"
        if hint:
            msg += f"; did you mean {hint!r}?"
        raise UnknownNameError(msg + " (see timm.list_models())")
    arch, tag = timm.models.split_model_name_tag(name)
    if tag:
        tags = timm.list_pretrained(f"{arch}.*")
        if name not in tags:
            hint = closest(name, tags)
            msg = f"timm has no pretrained tag {tag!r} for backbone {arch!r}"
            msg += f"; did you mean {hint!r}?" if hint else ""
            raise UnknownNameError(msg + f" (tags: {', '.join(tags) or 'none'})")


def _output_is_nhwc(body: nn.Module) -> bool:
    fmt = getattr(body, "output_fmt", "NCHW")
    return str(getattr(fmt, "value", fmt)) == "NHWC"


class Backbone(nn.Module):
    """A timm features-only model returning NCHW maps at `strides` with `channels` each.

    Attributes:
        body: the timm features-only module (its state dict keys are timm's).
        name: the timm architecture name.
        channels, strides: per returned level.
    """

    def __init__(
        self,
        body: nn.Module,
        name: str,
        levels: Sequence[int] | None = None,
        channels_last: bool = False,
        output_norm: str = "none",
        output_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.body = body
        self.name = name
        info = body.feature_info
        all_channels, all_strides = list(info.channels()), list(info.reduction())
        if levels is None:
            levels = range(len(all_channels))
        self.levels: list[int] = list(levels)
        self.channels: list[int] = [all_channels[i] for i in self.levels]
        self.strides: list[int] = [all_strides[i] for i in self.levels]
        self.nhwc = _output_is_nhwc(body)
        self.channels_last = channels_last
        if channels_last:
            self.body.to(memory_format=torch.channels_last)
        self._plan: list[Callable[[Tensor], Tensor]] | None = None
        self._to_map: Callable[[Tensor, tuple[int, int]], Tensor] | None = None
        if output_norm not in OUTPUT_NORMS:
            raise BackboneError(f"unknown backbone.output_norm {output_norm!r} (valid: {', '.join(OUTPUT_NORMS)})")
        self.output_norm = output_norm
        normed = {"none": [], "last": [len(self.levels) - 1], "all": list(range(len(self.levels)))}[output_norm]
        # a LayerNorm over the channels of each normalised level (index i: output level i)
        self.output_norms = nn.ModuleDict({str(i): nn.LayerNorm(self.channels[i], eps=output_norm_eps) for i in normed})

    def __getstate__(self) -> dict[str, Any]:
        # the stage plan holds closures over this instance's modules: a copy must build its own
        state = self.__dict__.copy()
        state["_plan"] = None
        state["_to_map"] = None
        return state

    # ------------------------------------------------------------------ plain forward
    def forward(self, x: Tensor) -> list[Tensor]:
        """Images N x 3 x H x W -> list of N x C_i x H/s_i x W/s_i maps."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.body(x)
        if isinstance(out, dict):
            out = list(out.values())
        out = [out[i] for i in self.levels]
        if self.nhwc:
            out = [o.permute(0, 3, 1, 2) for o in out]
        for key, norm in self.output_norms.items():
            i = int(key)
            out[i] = norm(out[i].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass to save memory."""
        target = self.body.model if isinstance(self.body, FeatureGetterNet) else self.body
        if not hasattr(target, "set_grad_checkpointing"):
            raise BackboneError(f"backbone {self.name!r} does not support gradient checkpointing")
        target.set_grad_checkpointing(enable)

    @property
    def grad_checkpointing(self) -> bool:
        body = self.body.model if isinstance(self.body, FeatureGetterNet) else self.body
        return bool(getattr(body, "grad_checkpointing", False))

    # ------------------------------------------------------------------ staged forward
    @property
    def num_stages(self) -> int:
        return len(self.levels)

    @property
    def state_channel_dim(self) -> int:
        """The channel axis of the tensors passed between stages (1 for NCHW, -1 for NHWC and tokens)."""
        self.prepare_stages()
        return -1 if (self.nhwc or isinstance(self.body, FeatureGetterNet)) else 1

    def begin(self, x: Tensor) -> Tensor:
        """The state that enters stage 0 (the images, in the backbone's memory format)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def run_stage(self, index: int, state: Tensor) -> Tensor:
        """Run stage `index` on the state left by the previous stage (or `begin`)."""
        self.prepare_stages()
        assert self._plan is not None
        return self._plan[index](state)

    def stage_feature(self, state: Tensor, image_size: tuple[int, int]) -> Tensor:
        """The NCHW feature map of a stage's output state (images of `image_size` went in)."""
        self.prepare_stages()
        assert self._to_map is not None
        return self._to_map(state, image_size)

    def forward_staged(self, x: Tensor) -> list[Tensor]:
        """Same result as `forward`, computed stage by stage."""
        state, out = self.begin(x), []
        for i in range(self.num_stages):
            state = self.run_stage(i, state)
            out.append(self.stage_feature(state, tuple(x.shape[-2:])))
        return out

    def prepare_stages(self) -> None:
        """Split the model into stages (BackboneError for architectures that cannot be split)."""
        if self._plan is not None:
            return
        if self.output_norms:
            raise BackboneError(f"backbone {self.name!r} with output_norm={self.output_norm!r} cannot be run stage by stage")
        body = self.body
        if isinstance(body, FeatureDictNet):
            self._plan, self._to_map = self._plan_module_list(body)
        elif hasattr(body, "_stage_out_idx") and hasattr(body, "blocks") and getattr(body, "feature_hooks", 1) is None:
            self._plan, self._to_map = self._plan_efficientnet(body)
        elif isinstance(body, FeatureGetterNet) and _is_plain_vit(body.model):
            self._plan, self._to_map = self._plan_vit(body)
        else:
            raise BackboneError(
                f"backbone {self.name!r} ({type(body).__name__}) cannot be run stage by stage; "
                "stage-wise decoders support FeatureListNet models (ResNet, ConvNeXt, Swin, ...), "
                "EfficientNet/MobileNet and plain ViTs"
            )

    def _plan_module_list(self, body: FeatureDictNet):
        items = list(body.items())
        ends = [i for i, (n, _) in enumerate(items) if n in body.return_layers]
        level_ends = [ends[lv] for lv in self.levels]
        plan, start = [], 0
        for end in level_ends:
            mods = [m for _, m in items[start : end + 1]]
            plan.append(self._sequence(mods, select_first=not body.concat))
            start = end + 1
        nhwc = self.nhwc
        return plan, (lambda s, size: s.permute(0, 3, 1, 2) if nhwc else s)

    def _plan_efficientnet(self, body: nn.Module):
        stem_parts = [body.conv_stem, body.bn1] + ([body.act1] if hasattr(body, "act1") else [])
        stem = nn.Sequential(*stem_parts)
        mods = [stem, *list(body.blocks)]
        out_positions = sorted(body._stage_out_idx.keys())
        # output k taps the state after module position p (0 = stem, i + 1 = after blocks[i])
        ends = [out_positions[lv] for lv in self.levels]
        plan, start = [], 0
        for end in ends:
            plan.append(self._sequence(mods[start : end + 1]))
            start = end + 1
        return plan, (lambda s, size: s)

    def _plan_vit(self, body: FeatureGetterNet):
        vit = body.model
        indices = sorted(int(i) for i in body.out_indices)
        ends = [indices[lv] for lv in self.levels]

        def embed(x: Tensor) -> Tensor:
            x = vit.patch_embed(x)
            x = vit._pos_embed(x)
            x = vit.patch_drop(x)
            return vit.norm_pre(x)

        plan, start = [], 0
        for k, end in enumerate(ends):
            blocks = list(vit.blocks[start : end + 1])
            seq = self._sequence(blocks, checkpoint_owner=vit)
            plan.append((lambda x, seq=seq: seq(embed(x))) if k == 0 else seq)
            start = end + 1
        prefix = vit.num_prefix_tokens

        def to_map(tokens: Tensor, size: tuple[int, int]) -> Tensor:
            h, w = vit.patch_embed.dynamic_feat_size(size)
            tokens = tokens[:, prefix:]
            return tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)

        return plan, to_map

    def _sequence(self, mods: list[nn.Module], select_first: bool = True, checkpoint_owner: nn.Module | None = None):
        owner = checkpoint_owner if checkpoint_owner is not None else self.body

        def run(x: Tensor) -> Tensor:
            use_ckpt = bool(getattr(owner, "grad_checkpointing", False)) and torch.is_grad_enabled()
            for m in mods:
                if use_ckpt and not getattr(m, "inplace", False) and x.requires_grad:
                    x = checkpoint(m, x, use_reentrant=False)
                else:
                    x = m(x)
                if isinstance(x, (tuple, list)):
                    x = x[0] if select_first else torch.cat(x, 1)
            return x

        return run


def _is_plain_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _check_weights_file(path: str | os.PathLike) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise BackboneError(
            f"backbone weights file {str(file)!r} does not exist; set the backbone.weights option to a local "
            ".safetensors, .pth or .bin file, or backbone.weights=null with backbone.pretrained=true for timm's "
            "pretrained weights through the Hugging Face hub cache, or backbone.pretrained=false to train from scratch"
        )
    return file


def pretrained_hub_id(name: str) -> str:
    """The hub repo (or URL) timm loads `name`'s pretrained weights from: its tag's, or the default tag's."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as exc:  # an invalid tag
        raise BackboneError(str(exc)) from None
    source = cfg and (cfg.hf_hub_id or cfg.url)
    if not source:
        raise BackboneError(
            f"timm has no pretrained weights for backbone {name!r}; set backbone.weights to a local weights file, "
            "or backbone.pretrained=false to train from scratch"
        )
    return str(source)


def _hub_error(name: str, hub_id: str, exc: BaseException) -> BackboneError:
    """The one message for pretrained weights that neither the hub cache nor the network can give."""
    if hub_offline():
        why = "the hub is offline (HF_HUB_OFFLINE is set) and they are not in the hub cache"
    else:
        why = "they are not in the hub cache and could not be downloaded"
    detail = "" if isinstance(exc, FileNotFoundError) else f" ({type(exc).__name__}: {str(exc)[:200]})"
    return BackboneError(
        f"cannot load timm's pretrained weights for backbone {name!r} ({hub_id}): {why} {hub_cache_dir()!r}"
        f"{detail}. Either set "
        "model.backbone.weights to a local weights file (.safetensors, .pth or .bin), or fill the hub cache: run "
        f"once with the network on and HF_HUB_OFFLINE unset (python -c \"import timm; timm.create_model('{name}', "
        "pretrained=True)\"), or point HF_HUB_CACHE at a cache that holds them. "
        "model.backbone.pretrained=false trains from scratch"
    )


def _hub_failures() -> tuple[type[BaseException], ...]:
    """The exceptions with which fetching hub or URL weights fails (missing in the cache, offline, HTTP)."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    return (OSError, EntryNotFoundError, HfHubHTTPError)


def create_backbone(
    name: str,
    *,
    out_indices: Sequence[int] | None = None,
    weights: str | os.PathLike | None = None,
    pretrained: bool | None = None,
    drop_path_rate: float | None = None,
    channels_last: bool = False,
    grad_checkpointing: bool = False,
    min_stride: int = DEFAULT_MIN_STRIDE,
    output_norm: str = "none",
    output_norm_eps: float = 1e-6,
    swin_impl: str = "timm",
    upsample_mode: str | None = None,
    bn_momentum: float | None = None,
    **kwargs: Any,
) -> Backbone:
    """Build timm model `name` as a multi-scale `Backbone`.

    Args:
        name: timm architecture name (`timm.list_models()`), optionally with a pretrained tag
            (`timm.list_pretrained()`, e.g. "vit_large_patch16_384.augreg_in21k_ft_in1k").
        out_indices: timm feature indices to return; None keeps timm's default levels whose stride is
            at least `min_stride`.
        weights: local weights file (safetensors, or `.pth`/`.bin` read with `weights_only=True`), in
            the original timm model's naming.
        pretrained: True: pretrained weights, from `weights` when given, else timm's tag of `name` (its
            default tag when `name` has none) through the Hugging Face hub cache, as
            `timm.create_model(name, pretrained=True)` loads them (HF_HUB_OFFLINE respected: offline, the
            cache must hold them); False: random initialisation (a `weights` file is not loaded, with a
            warning); None: `weights` when given, else random.
        drop_path_rate: stochastic depth rate, for models that take one.
        channels_last: run the backbone in channels-last memory format.
        grad_checkpointing: recompute activations in the backward pass.
        output_norm: "none", "last" or "all": LayerNorms (eps `output_norm_eps`) on the returned
            levels (see OUTPUT_NORMS). With "last" on a ViT and pretrained weights, the last level's norm
            starts from the weights' final norm (`norm.weight`, `norm.bias`).
        swin_impl: "timm", or "mmseg" for a timm Swin Transformer with mmseg's window attention
            (padding before the cyclic shift, no window shrinking; see SWIN_IMPLS).
        upsample_mode: None (timm's) or a mode from UPSAMPLE_MODES for every `nn.Upsample` of the
            model ("bilinear" with align_corners=False: the HRNet fuse layers of the MTI-Net / PAD-Net
            release, where timm's are "nearest"); an error for a model without one.
        bn_momentum: None (timm's) or the momentum of every BatchNorm of the model (the release HRNet's
            is 0.01, timm's 0.1).
        **kwargs: further timm model arguments (e.g. img_size, depth, dynamic_img_size).

    `name` "segnet" builds the benchmark's `SegNet` instead (`mtvision/models/segnet.py`; kwargs:
    `widths`), trained from scratch: see `_create_segnet` for the options it takes.
    """
    if name == SEGNET_NAME:
        return _create_segnet(out_indices=out_indices, weights=weights, pretrained=pretrained,
                              drop_path_rate=drop_path_rate, channels_last=channels_last,
                              grad_checkpointing=grad_checkpointing, output_norm=output_norm, swin_impl=swin_impl,
                              upsample_mode=upsample_mode, bn_momentum=bn_momentum, **kwargs)
    check_backbone_name(name)
    if swin_impl not in SWIN_IMPLS:
        raise BackboneError(f"unknown backbone.swin_impl {swin_impl!r} (valid: {', '.join(SWIN_IMPLS)})")
    if swin_impl == "mmseg":
        kwargs = _mmseg_swin_kwargs(name, kwargs)
    load = weights is not None if pretrained is None else bool(pretrained)
    if pretrained is False and weights is not None:
        _log.warning("backbone.pretrained is false: backbone.weights %r is not loaded (random initialisation)", str(weights))
    timm_kwargs: dict[str, Any] = dict(kwargs)
    if out_indices is not None:
        timm_kwargs["out_indices"] = tuple(int(i) for i in out_indices)
    if drop_path_rate is not None:
        timm_kwargs["drop_path_rate"] = float(drop_path_rate)
    file: Path | None = None
    hub_id: str | None = None
    if load and weights is not None:
        file = _check_weights_file(weights)
        timm_kwargs["pretrained_cfg_overlay"] = dict(file=str(file), source="", custom_load=file.suffix == ".npz")
        source = f"backbone.weights {str(weights)!r}"
    elif load:
        hub_id = pretrained_hub_id(name)
        source = f"timm's pretrained weights {hub_id!r}"
    try:
        with _collect_missing_keys() as missing:
            body = timm.create_model(name, pretrained=load, features_only=True, **timm_kwargs)
        absent = missing.non_classifier(name) if load else []
        if absent:
            raise BackboneError(f"{len(absent)} tensors are missing from the weights, e.g. {absent[:5]}")
    except (pickle.UnpicklingError, EOFError) as exc:
        if not load:
            raise
        raise BackboneError(
            f"{source} is not a plain tensor file and will not be unpickled "
            f"(only tensors load, torch.load(weights_only=True)): {exc}"
        ) from exc
    except BackboneError as exc:
        raise BackboneError(f"cannot load {source} into {name!r}: {exc}") from None
    except Exception as exc:
        if not load:
            raise
        if hub_id is not None and isinstance(exc, _hub_failures()):
            raise _hub_error(name, hub_id, exc) from exc
        raise BackboneError(f"cannot load {source} into {name!r}: {exc}") from exc
    _set_upsampling(body, name, upsample_mode)
    _set_bn_momentum(body, name, bn_momentum)
    strides = list(body.feature_info.reduction())
    if out_indices is None:
        levels = [i for i, s in enumerate(strides) if s >= min_stride] or [len(strides) - 1]
    else:
        levels = list(range(len(strides)))
    if swin_impl == "mmseg":
        use_mmseg_windows(body)
    backbone = Backbone(body, name, levels=levels, channels_last=channels_last, output_norm=output_norm,
                        output_norm_eps=output_norm_eps)
    if output_norm == "last" and load:
        norm_file = file if file is not None else _cached_hub_file(name)
        if norm_file is not None:
            _load_final_norm(backbone, norm_file)
    if grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return backbone


def _create_segnet(*, weights: Any, pretrained: bool | None, channels_last: bool, bn_momentum: float | None,
                   **options: Any) -> SegNet:
    """The benchmark's SegNet: random initialisation (no pretrained SegNet exists), any timm-only
    option left at its default; `widths` (five stage widths) is its one model argument."""
    if pretrained or weights is not None:
        raise BackboneError("backbone 'segnet' trains from scratch (there are no pretrained SegNet weights): "
                            "set model.backbone.pretrained: false and leave backbone.weights unset")
    widths = options.pop("widths", None)
    defaults = {"out_indices": None, "drop_path_rate": None, "grad_checkpointing": False, "output_norm": "none",
                "swin_impl": "timm", "upsample_mode": None}
    unused = sorted(k for k, v in options.items() if defaults.get(k, object()) != v)
    if unused:
        raise BackboneError(f"backbone 'segnet' does not take option(s) {unused} (its model argument: kwargs.widths)")
    model = SegNet() if widths is None else SegNet(widths)
    _set_bn_momentum(model, SEGNET_NAME, bn_momentum)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _mmseg_swin_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm arguments for mmseg's Swin: full windows and shifts on every map, masks for any input size."""
    if timm.models.model_entrypoint(name).__module__ != "timm.models.swin_transformer":
        raise BackboneError(f"backbone.swin_impl 'mmseg' applies to timm's Swin Transformers (swin_*), not {name!r}")
    if not kwargs.get("always_partition", True):
        raise BackboneError("backbone.swin_impl 'mmseg' never shrinks windows: drop always_partition: false")
    return {**kwargs, "always_partition": True, "strict_img_size": False}


def _set_upsampling(body: nn.Module, name: str, mode: str | None) -> None:
    """Every `nn.Upsample` of `body` set to `mode` (align_corners=False for the linear modes)."""
    if mode is None:
        return
    if mode not in UPSAMPLE_MODES:
        raise BackboneError(f"unknown backbone.upsample_mode {mode!r} (valid: {', '.join(UPSAMPLE_MODES)})")
    layers = [m for m in body.modules() if isinstance(m, nn.Upsample)]
    if not layers:
        raise BackboneError(f"backbone.upsample_mode applies to models with nn.Upsample layers, {name!r} has none")
    for layer in layers:
        layer.mode = mode
        layer.align_corners = False if mode == "bilinear" else None


def _set_bn_momentum(body: nn.Module, name: str, momentum: float | None) -> None:
    """The running-statistics momentum of every BatchNorm of `body`."""
    if momentum is None:
        return
    if not 0 < momentum <= 1:
        raise BackboneError(f"backbone.bn_momentum must be in (0, 1], got {momentum}")
    layers = [m for m in body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        raise BackboneError(f"backbone.bn_momentum applies to models with BatchNorm layers, {name!r} has none")
    for layer in layers:
        layer.momentum = float(momentum)


def _cached_hub_file(name: str) -> Path | None:
    """The hub-cache file timm loaded `name`'s pretrained weights from (None for URL-only weights)."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models._hub import hf_split

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, revision = hf_split(cfg.hf_hub_id)
    for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, revision=revision) if filename else None
        if isinstance(found, str):
            return Path(found)
    return None


def _load_final_norm(backbone: Backbone, file: Path) -> None:
    """The last level's output norm from the weights file's final norm, when the file has one that fits."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as fh:
            state = {k: fh.get_tensor(k) for k in ("norm.weight", "norm.bias") if k in fh.keys()}
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    norm = backbone.output_norms[str(len(backbone.levels) - 1)]
    found = {k: state.get(f"norm.{k}") for k in ("weight", "bias")}
    if all(isinstance(v, Tensor) and v.shape == norm.weight.shape for v in found.values()):
        with torch.no_grad():
            norm.weight.copy_(found["weight"])
            norm.bias.copy_(found["bias"])
