"""Camera rays, tri-plane sampling and volume rendering for the 3D-aware regulariser, batched over
images, rays and samples (no loop over rays, no compiled extension).

Conventions: camera frame x right, y down, z forward; pixel centres at integer coordinates (as in
`mtvision/data/camera.py`); a ray's direction has z = 1, so the distance parameter t of a point
t * d is its z-depth, the quantity depth maps hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def pixel_centres(image_size: Sequence[int], grid_size: Sequence[int], device=None, dtype=None) -> tuple[Tensor, Tensor]:
    """(u, v): the image-pixel coordinates of the centres of an h x w grid laid over an H x W image
    (grid cell (i, j) covers the image's block of H/h x W/w pixels), each h x w."""
    (height, width), (h, w) = image_size, grid_size
    u = (torch.arange(w, device=device, dtype=dtype) + 0.5) * (width / w) - 0.5
    v = (torch.arange(h, device=device, dtype=dtype) + 0.5) * (height / h) - 0.5
    return u[None, :].expand(h, w), v[:, None].expand(h, w)


def pixel_rays(intrinsics: Tensor, image_size: Sequence[int], grid_size: Sequence[int]) -> Tensor:
    """N x h x w x 3 ray directions (z = 1) through the centres of an h x w grid over an H x W image
    seen by cameras `intrinsics` (N x 3 x 3)."""
    u, v = pixel_centres(image_size, grid_size, intrinsics.device, intrinsics.dtype)
    pixels = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # h x w x 3
    d = torch.einsum("nij,hwj->nhwi", torch.linalg.inv(intrinsics), pixels)
    return d / d[..., 2:3]


def sample_depths(near: float, far: float, samples: int, shape: Sequence[int], stratified: bool,
                  device=None, dtype=None) -> Tensor:
    """`shape` x `samples` increasing depths in [near, far]: one uniform draw in each of `samples`
    equal bins (stratified), else `samples` evenly spaced depths from near to far inclusive."""
    if not stratified:
        t = torch.linspace(near, far, samples, device=device, dtype=dtype)
        return t.expand(*shape, samples)
    edges = torch.linspace(near, far, samples + 1, device=device, dtype=dtype)
    jitter = torch.rand(*shape, samples, device=device, dtype=dtype)
    return edges[:-1] + jitter * (edges[1:] - edges[:-1])


def frustum_box(intrinsics: Tensor, image_size: Sequence[int], near: float, far: float) -> tuple[Tensor, Tensor]:
    """(low, high), each N x 3: the axis-aligned box in the camera frame that holds each camera's
    view frustum from depth `near` to `far` (the image's outer pixel edges)."""
    height, width = image_size
    corners = torch.tensor([[-0.5, -0.5], [width - 0.5, -0.5], [-0.5, height - 0.5], [width - 0.5, height - 0.5]],
                           device=intrinsics.device, dtype=intrinsics.dtype)
    pixels = torch.cat([corners, torch.ones_like(corners[:, :1])], dim=1)  # 4 x 3
    d = torch.einsum("nij,kj->nki", torch.linalg.inv(intrinsics), pixels)
    d = d / d[..., 2:3]  # N x 4 x 3, z = 1
    points = torch.cat([d * near, d * far], dim=1)  # N x 8 x 3
    return points.amin(dim=1), points.amax(dim=1)


def normalise_points(points: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Points (N x ... x 3) mapped to [-1, 1]^3 by each image's box (low, high: N x 3)."""
    shape = (points.shape[0],) + (1,) * (points.ndim - 2) + (3,)
    low, high = low.view(shape), high.view(shape)
    return 2 * (points - low) / (high - low).clamp_min(1e-12) - 1


def sample_triplane(planes: Tensor, coords: Tensor) -> Tensor:
    """Tri-plane features at normalised points: planes N x 3 x C x h x w (the xy, xz and yz planes),
    coords N x P x 3 in [-1, 1]; returns N x P x C, the sum of the three bilinear samples.

    Each plane's columns run along its first axis and its rows along its second, except the yz
    plane, whose columns run along z and rows along y (so y runs down the rows of the xy and yz
    planes alike); samples outside a plane are zero.
    """
    n, _, c, h, w = planes.shape
    x, y, z = coords.unbind(dim=-1)
    grids = torch.stack([torch.stack([x, y], -1), torch.stack([x, z], -1), torch.stack([z, y], -1)], dim=1)  # N x 3 x P x 2
    sampled = F.grid_sample(planes.reshape(n * 3, c, h, w), grids.reshape(n * 3, 1, -1, 2),
                            mode="bilinear", padding_mode="zeros", align_corners=False)  # 3N x C x 1 x P
    return sampled.view(n, 3, c, -1).sum(dim=1).transpose(1, 2)


def render_weights(sigma: Tensor, depths: Tensor, opaque_far: bool = True) -> Tensor:
    """Volume-rendering weights of samples along rays: w_i = T_i (1 - exp(-sigma_i delta_i)) with
    T_i = exp(-sum_{j<i} sigma_j delta_j) and delta_i = t_{i+1} - t_i (sigma, depths: ... x S).

    The last sample's interval runs to the end of the ray: with `opaque_far` it takes all the
    remaining transmittance (w_S = T_S, so the weights sum to one), else it has no extent (w_S = 0).
    """
    delta = depths[..., 1:] - depths[..., :-1]
    optical = sigma[..., :-1] * delta  # sigma_i delta_i, i < S
    through = torch.cumsum(optical, dim=-1)
    transmittance = torch.exp(-torch.cat([torch.zeros_like(through[..., :1]), through], dim=-1))  # T_1 .. T_S
    alpha = -torch.expm1(-optical)
    last = transmittance[..., -1:] if opaque_far else torch.zeros_like(transmittance[..., -1:])
    return torch.cat([transmittance[..., :-1] * alpha, last], dim=-1)


def composite(weights: Tensor, values: Tensor) -> Tensor:
    """Rendered values: sum_i w_i v_i (weights ... x S, values ... x S x C -> ... x C)."""
    return (weights.unsqueeze(-1) * values).sum(dim=-2)
