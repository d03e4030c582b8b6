"""The options of the 3D-aware regulariser (`model.regularizer3d` in a model config)."""

from __future__ import annotations

from dataclasses import dataclass

from mtvision.config_io import ConfigError


@dataclass
class Regularizer3DConfig:
    """The 3D-aware regulariser of `mtvision/models/regularizer3d/model.py` (training only).

    channels: feature channels of each of the three planes; hidden: width of the one hidden layer
    of the density MLP and of each task's MLP; samples: points per camera ray; near, far: the depth
    range (metres, z in the camera frame) the rays are sampled in, and the box the tri-plane spans;
    stratified: one uniform draw inside each of the `samples` equal depth bins (else the bin edges
    from near to far); depth_from_density: the rendered depth is the expected ray termination depth
    (weights x sample depths) rather than a depth MLP's composite; in_channels: the channels of the
    decoder's shared representation (None: found by one small forward when the model is built).
    """

    channels: int = 32
    hidden: int = 64
    samples: int = 32
    near: float = 0.1
    far: float = 10.0
    stratified: bool = True
    depth_from_density: bool = True
    in_channels: int | None = None

    def validate(self) -> None:
        if min(self.channels, self.hidden) < 1 or self.samples < 2:
            raise ConfigError(
                f"model.regularizer3d: channels and hidden must be >= 1 and samples >= 2, got {self.channels}, {self.hidden}, {self.samples}"
            )
        if not 0 < self.near < self.far:
            raise ConfigError(f"model.regularizer3d: need 0 < near < far, got near={self.near}, far={self.far}")
        if self.in_channels is not None and self.in_channels < 1:
            raise ConfigError(f"model.regularizer3d.in_channels must be positive or null, got {self.in_channels}")
