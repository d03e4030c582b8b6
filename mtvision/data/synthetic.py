"""Procedural indoor scenes with exact multi-task labels: the embedded default dataset.

Every sample is a room (floor, walls, ceiling) furnished with box, cylinder and sphere primitives,
seen from a camera standing inside it and aimed at the furniture.  Vectorised ray casting gives,
per pixel, the z-depth in metres, the camera-frame surface normal, the semantic class and the
instance.  The RGB image comes from per-instance procedural textures whose colour ranges overlap
between classes, Lambertian shading from a few point lights and sensor noise.  Boundaries are the
instance, depth and normal discontinuities; saliency is the mask of the furniture objects.
`texture` is a deliberately unrelated task for sanity checks (e.g. of branching search): the mask of
the pixels painted in their surface's accent colour, a random pattern per instance that says
nothing about class or geometry.

Conventions: world z is up; the camera frame is OpenCV's (x right, y down, z forward); normals
face the camera; depth is the z coordinate in the camera frame (like a Kinect depth map).  Each sample's
meta["intrinsics"] is the exact camera matrix the rays were cast with.
Each sample is a pure function of (seed, index) and of the resolution.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from mtvision.data.base import MultiTaskDataset, RawTransform
from mtvision.data.camera import intrinsics_matrix

CLASS_NAMES: tuple[str, ...] = (
    "floor",
    "wall",
    "ceiling",
    "table",
    "cabinet",
    "sofa",
    "pillar",
    "ball",
    "picture",
    "bed",
)
FLOOR, WALL, CEILING, TABLE, CABINET, SOFA, PILLAR, BALL, PICTURE, BED = range(len(CLASS_NAMES))
SALIENT_CLASSES = (TABLE, CABINET, SOFA, PILLAR, BALL, BED)

# Hue ranges (degrees) per class: wide and overlapping on purpose, so colour alone cannot classify.
_HUE_RANGE = {
    FLOOR: (0, 80),
    WALL: (20, 240),
    CEILING: (30, 220),
    TABLE: (0, 90),
    CABINET: (10, 200),
    SOFA: (150, 360),
    PILLAR: (0, 360),
    BALL: (0, 360),
    PICTURE: (0, 360),
    BED: (180, 330),
}

# rows of the per-instance texture table: base rgb, accent rgb, pattern mix (plain, stripes,
# checker, waves), frequency, stripe axis xyz
_TEXTURE_ROWS = 14
NormalFn = Callable[[np.ndarray], np.ndarray]  # boolean ray mask -> 3 x M world normals of those rays
_EPS = np.float32(1e-6)
_FAR = np.float32(1e9)


@dataclass
class Primitive:
    """One solid in the scene: a yawed box, a vertical cylinder or a sphere."""

    kind: str  # "box" | "cylinder" | "sphere"
    center: np.ndarray  # world xyz
    size: np.ndarray  # box: half extents xyz; cylinder: (radius, radius, half height); sphere: (r, r, r)
    yaw: float
    class_id: int
    instance_id: int

    def corners(self) -> np.ndarray:
        """8 x 3 world corners of a box that bounds the primitive."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float32)
        return (_CORNER_SIGNS * self.size) @ rot.T + self.center


_CORNER_SIGNS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float32)


@dataclass
class Scene:
    """A furnished room, its lights, and the per-instance texture table."""

    room: np.ndarray  # (length x, length y, height z); the room spans [0, room]
    primitives: list[Primitive]
    lights: np.ndarray  # L x 3 positions
    light_power: np.ndarray  # L
    instance_class: np.ndarray  # I: class of each instance (instances 0..5 are the room's six faces)
    textures: np.ndarray = field(default_factory=lambda: np.zeros((_TEXTURE_ROWS, 0), np.float32))  # K x I, see _make_textures


@dataclass
class Camera:
    """A pinhole camera: world position, world-from-camera rotation, and intrinsics."""

    position: np.ndarray
    rotation: np.ndarray  # 3 x 3, columns are the camera axes (x right, y down, z forward) in world
    fx: float
    fy: float
    cx: float
    cy: float


# ---------------------------------------------------------------------------------------- scenes
def _place_footprints(rng: np.random.Generator, room: np.ndarray, radii: list[float]) -> list[np.ndarray | None]:
    """Non-overlapping 2D positions for circles of the given radii inside the room (None when no room)."""
    centers = np.zeros((0, 2))
    placed_r = np.zeros(0)
    out: list[np.ndarray | None] = []
    for r in radii:
        candidates = rng.uniform([r + 0.05, r + 0.05], [room[0] - r - 0.05, room[1] - r - 0.05], size=(30, 2))
        gaps = np.linalg.norm(candidates[:, None] - centers[None], axis=-1) - placed_r - r
        free = np.flatnonzero((gaps > 0.1).all(axis=1))
        if free.size:
            spot = candidates[free[0]]
            centers = np.vstack([centers, spot])
            placed_r = np.append(placed_r, r)
            out.append(spot)
        else:
            out.append(None)
    return out


def make_scene(rng: np.random.Generator) -> Scene:
    """A random furnished room."""
    room = rng.uniform([4.0, 4.0, 2.5], [7.0, 7.0, 3.2]).astype(np.float32)
    prims: list[Primitive] = []
    classes = [FLOOR, WALL, WALL, WALL, WALL, CEILING]  # instances 0..5: the room faces
    next_instance = len(classes)

    def add(kind: str, center, size, yaw: float, cls: int, inst: int) -> None:
        prims.append(
            Primitive(kind, np.asarray(center, np.float32), np.asarray(size, np.float32), float(yaw), cls, inst)
        )

    furniture = list(rng.choice([TABLE, CABINET, SOFA, BED, PILLAR, BALL, TABLE, CABINET], size=rng.integers(4, 8)))
    sizes = {
        TABLE: lambda: rng.uniform([0.4, 0.3, 0.36], [0.9, 0.6, 0.4]),
        CABINET: lambda: rng.uniform([0.3, 0.2, 0.4], [0.7, 0.35, 1.0]),
        SOFA: lambda: rng.uniform([0.7, 0.35, 0.4], [1.1, 0.5, 0.45]),
        BED: lambda: rng.uniform([0.9, 0.7, 0.25], [1.1, 1.0, 0.3]),
        PILLAR: lambda: rng.uniform([0.12, 0.12, 0.4], [0.3, 0.3, 1.2]),
        BALL: lambda: np.full(3, rng.uniform(0.12, 0.35)),
    }
    dims = [sizes[c]() for c in furniture]
    spots = _place_footprints(rng, room, [float(np.hypot(d[0], d[1])) for d in dims])
    for cls, d, spot in zip(furniture, dims, spots):
        if spot is None:
            continue
        yaw = float(rng.uniform(0, math.pi)) if rng.random() < 0.6 else 0.0
        inst = next_instance
        next_instance += 1
        classes.append(cls)
        x, y = spot
        if cls == TABLE:  # a top on four legs
            top = 0.03
            add("box", (x, y, 2 * d[2] - top), (d[0], d[1], top), yaw, cls, inst)
            c, s = math.cos(yaw), math.sin(yaw)
            leg = 0.035
            for lx, ly in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                ox, oy = lx * (d[0] - 2 * leg), ly * (d[1] - 2 * leg)
                center = (x + c * ox - s * oy, y + s * ox + c * oy, d[2] - top)
                add("box", center, (leg, leg, d[2] - top), yaw, cls, inst)
        elif cls == SOFA:  # a seat, a back and two arms
            c, s = math.cos(yaw), math.sin(yaw)
            seat_h = d[2] * 0.55
            add("box", (x, y, seat_h), (d[0], d[1], seat_h), yaw, cls, inst)
            back = 0.12
            ox, oy = 0.0, -(d[1] - back)
            add("box", (x + c * ox - s * oy, y + s * ox + c * oy, 1.9 * d[2]), (d[0], back, 0.9 * d[2] * 1.0), yaw, cls, inst)
            for side in (-1, 1):
                ox, oy = side * (d[0] - 0.08), 0.0
                add("box", (x + c * ox - s * oy, y + s * ox + c * oy, 1.3 * d[2]), (0.08, d[1], 0.3 * d[2] + 0.05), yaw, cls, inst)
        elif cls == BED:  # a base, a mattress and a headboard
            c, s = math.cos(yaw), math.sin(yaw)
            add("box", (x, y, d[2]), (d[0], d[1], d[2]), yaw, cls, inst)
            ox, oy = 0.0, d[1] - 0.05
            add("box", (x + c * ox - s * oy, y + s * ox + c * oy, 2.2 * d[2]), (d[0], 0.05, 1.2 * d[2]), yaw, cls, inst)
        elif cls == CABINET:
            add("box", (x, y, d[2]), d, yaw, cls, inst)
        elif cls == PILLAR:
            add("cylinder", (x, y, d[2]), (d[0], d[0], d[2]), 0.0, cls, inst)
        elif cls == BALL:
            add("sphere", (x, y, d[0]), d, 0.0, cls, inst)
    # pictures: thin boxes on the walls
    for _ in range(rng.integers(1, 4)):
        wall = int(rng.integers(4))
        w, h = rng.uniform(0.3, 0.9), rng.uniform(0.25, 0.6)
        zc = rng.uniform(1.2, room[2] - 0.5)
        depth = 0.02
        along = rng.uniform(w + 0.1, (room[0] if wall < 2 else room[1]) - w - 0.1)
        if wall == 0:
            center, size = (along, depth, zc), (w, depth, h)
        elif wall == 1:
            center, size = (along, room[1] - depth, zc), (w, depth, h)
        elif wall == 2:
            center, size = (depth, along, zc), (depth, w, h)
        else:
            center, size = (room[0] - depth, along, zc), (depth, w, h)
        classes.append(PICTURE)
        add("box", center, size, 0.0, PICTURE, next_instance)
        next_instance += 1

    n_lights = int(rng.integers(2, 4))
    lights = np.stack(
        [rng.uniform(0.5, room[0] - 0.5, n_lights), rng.uniform(0.5, room[1] - 0.5, n_lights), np.full(n_lights, room[2] - 0.2)],
        axis=1,
    ).astype(np.float32)
    power = rng.uniform(2.5, 6.0, n_lights).astype(np.float32)
    instance_class = np.asarray(classes, dtype=np.int64)
    return Scene(room, prims, lights, power, instance_class, _make_textures(rng, instance_class))


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (h in degrees) -> RGB in [0, 1], shape (..., 3)."""
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - np.abs(h % 2 - 1))
    m = v - c
    sector = np.floor(h).astype(int) % 6
    r = np.choose(sector, [c, x, np.zeros_like(c), np.zeros_like(c), x, c])
    g = np.choose(sector, [x, c, c, x, np.zeros_like(c), np.zeros_like(c)])
    b = np.choose(sector, [np.zeros_like(c), np.zeros_like(c), x, c, c, x])
    return np.stack([r + m, g + m, b + m], axis=-1)


def _make_textures(rng: np.random.Generator, instance_class: np.ndarray) -> np.ndarray:
    """Per-instance texture parameters, one column per instance (rows: see _TEXTURE_ROWS)."""
    n = len(instance_class)
    lo = np.array([_HUE_RANGE[int(c)][0] for c in instance_class], dtype=np.float32)
    hi = np.array([_HUE_RANGE[int(c)][1] for c in instance_class], dtype=np.float32)
    hue = rng.uniform(lo, hi)
    base = _hsv_to_rgb(hue, rng.uniform(0.15, 0.9, n), rng.uniform(0.25, 0.9, n))
    accent = _hsv_to_rgb(hue + rng.uniform(-60, 60, n), rng.uniform(0.0, 0.9, n), rng.uniform(0.2, 1.0, n))
    pattern = rng.dirichlet(np.ones(4) * 0.5, size=n)  # plain, stripes, checker, waves
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    freq = rng.uniform(3.0, 14.0, n)[:, None]
    return np.ascontiguousarray(np.concatenate([base, accent, pattern, freq, axis], axis=1).T, dtype=np.float32)


def make_camera(rng: np.random.Generator, scene: Scene, height: int, width: int) -> Camera:
    """A camera inside the room, clear of the furniture, aimed at one of the objects."""
    room = scene.room
    objects = [p for p in scene.primitives if p.class_id in SALIENT_CLASSES]
    footprints = [(p.center[:2], float(np.hypot(p.size[0], p.size[1]))) for p in objects]
    position = np.array([room[0] / 2, room[1] / 2, 1.5], np.float32)
    for _ in range(30):
        candidate = rng.uniform([0.3, 0.3, 1.0], [room[0] - 0.3, room[1] - 0.3, min(1.8, room[2] - 0.3)])
        if all(np.hypot(*(candidate[:2] - c)) > r + 0.4 for c, r in footprints):
            position = candidate.astype(np.float32)
            break
    if objects:
        target = objects[int(rng.integers(len(objects)))].center.copy()
    else:
        target = np.array([room[0] / 2, room[1] / 2, 0.5], np.float32)
    target = target + rng.normal(0, 0.3, 3).astype(np.float32)
    forward = target - position
    if np.linalg.norm(forward[:2]) < 0.3:  # looking almost straight down is a poor view: look away
        forward[:2] = np.array([room[0] / 2, room[1] / 2]) - position[:2] + 0.3
    forward /= np.linalg.norm(forward)
    forward[2] = np.clip(forward[2], -0.7, 0.3)
    forward /= np.linalg.norm(forward)
    up = np.array([0, 0, 1], np.float32)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    roll = rng.normal(0, 0.03)
    right, down = right * math.cos(roll) + down * math.sin(roll), down * math.cos(roll) - right * math.sin(roll)
    rotation = np.stack([right, down, forward], axis=1).astype(np.float32)
    fov = math.radians(rng.uniform(55, 70))
    f = 0.5 * width / math.tan(fov / 2)
    return Camera(position, rotation, f, f, (width - 1) / 2.0, (height - 1) / 2.0)


# ---------------------------------------------------------------------------------------- ray casting
def _screen_rects(prims: list[Primitive], cam: Camera, height: int, width: int) -> list[tuple[int, int, int, int] | None]:
    """For each primitive, the pixel rectangle (y0, y1, x0, x1) that covers it, or None when it is out of view."""
    if not prims:
        return []
    pts = (np.stack([p.corners() for p in prims]) - cam.position) @ cam.rotation  # P x 8 x 3, camera frame
    z = pts[..., 2]
    zs = np.maximum(z, 0.05)
    u = cam.fx * pts[..., 0] / zs + cam.cx
    v = cam.fy * pts[..., 1] / zs + cam.cy
    behind, partly = (z <= 0.05).all(axis=1), (z <= 0.05).any(axis=1)
    x0 = np.maximum(np.floor(u.min(axis=1)).astype(int) - 1, 0)
    x1 = np.minimum(np.ceil(u.max(axis=1)).astype(int) + 2, width)
    y0 = np.maximum(np.floor(v.min(axis=1)).astype(int) - 1, 0)
    y1 = np.minimum(np.ceil(v.max(axis=1)).astype(int) + 2, height)
    rects: list[tuple[int, int, int, int] | None] = []
    for i in range(len(prims)):
        if behind[i]:
            rects.append(None)
        elif partly[i]:  # straddles the camera plane: projections are unreliable, cover the image
            rects.append((0, height, 0, width))
        elif x0[i] >= x1[i] or y0[i] >= y1[i]:
            rects.append(None)
        else:
            rects.append((int(y0[i]), int(y1[i]), int(x0[i]), int(x1[i])))
    return rects


def _intersect_box(o: np.ndarray, d: np.ndarray, prim: Primitive) -> tuple[np.ndarray, NormalFn]:
    """Entry distance (FAR on a miss) for rays o + t d (d: 3 x N) against a yawed box, and its normals."""
    c, s = math.cos(prim.yaw), math.sin(prim.yaw)
    rel = o - prim.center
    # rotate into the box frame (inverse yaw)
    local_o = (c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], rel[2])
    local_d = (c * d[0] + s * d[1], -s * d[0] + c * d[1], d[2])
    t_near = np.full(d.shape[1], -_FAR, np.float32)
    t_far = np.full(d.shape[1], _FAR, np.float32)
    axis = np.zeros(d.shape[1], np.int8)
    for a in range(3):
        inv = 1.0 / np.where(np.abs(local_d[a]) < _EPS, _EPS, local_d[a])
        t1 = (-prim.size[a] - local_o[a]) * inv
        t2 = (prim.size[a] - local_o[a]) * inv
        tmin = np.minimum(t1, t2)
        better = tmin > t_near
        t_near = np.where(better, tmin, t_near)
        axis = np.where(better, np.int8(a), axis)
        t_far = np.minimum(t_far, np.maximum(t1, t2))
    t = np.where((t_near <= t_far) & (t_near > 1e-3), t_near, _FAR)

    def normal_at(mask: np.ndarray) -> np.ndarray:
        # the entry face's axis, pointing against the ray, rotated back to the world
        ax = axis[mask]
        n = np.stack([np.where(ax == a, -np.sign(local_d[a][mask]), 0.0) for a in range(3)]).astype(np.float32)
        return np.stack([c * n[0] - s * n[1], s * n[0] + c * n[1], n[2]])

    return t, normal_at


def _intersect_cylinder(o: np.ndarray, d: np.ndarray, prim: Primitive) -> tuple[np.ndarray, NormalFn]:
    """Entry distance and world normal for a vertical capped cylinder."""
    r, half = prim.size[0], prim.size[2]
    rel = o - prim.center
    a = d[0] ** 2 + d[1] ** 2
    b = 2 * (rel[0] * d[0] + rel[1] * d[1])
    cc = rel[0] ** 2 + rel[1] ** 2 - r * r
    disc = b * b - 4 * a * cc
    sq = np.sqrt(np.maximum(disc, 0))
    t_side = (-b - sq) / (2 * np.maximum(a, _EPS))
    z_side = rel[2] + t_side * d[2]
    side_ok = (disc >= 0) & (t_side > 1e-3) & (np.abs(z_side) <= half)
    # caps (seen from above or below)
    dz = np.where(np.abs(d[2]) < _EPS, _EPS, d[2])
    t_cap = (np.where(dz < 0, half, -half) - rel[2]) / dz
    px, py = rel[0] + t_cap * d[0], rel[1] + t_cap * d[1]
    cap_ok = (t_cap > 1e-3) & (px * px + py * py <= r * r)
    t_side = np.where(side_ok, t_side, _FAR)
    t_cap = np.where(cap_ok, t_cap, _FAR)
    t = np.minimum(t_side, t_cap)

    def normal_at(mask: np.ndarray) -> np.ndarray:
        side = t_side[mask] <= t_cap[mask]
        tm = t[mask]
        hx, hy = rel[0] + tm * d[0][mask], rel[1] + tm * d[1][mask]
        return np.stack([np.where(side, hx / r, 0.0), np.where(side, hy / r, 0.0), np.where(side, 0.0, -np.sign(dz[mask]))]).astype(np.float32)

    return t, normal_at


def _intersect_sphere(o: np.ndarray, d: np.ndarray, prim: Primitive) -> tuple[np.ndarray, NormalFn]:
    """Entry distance and world normal for a sphere."""
    r = prim.size[0]
    rel = (o - prim.center)[:, None]
    a = (d * d).sum(0)
    b = 2 * (rel * d).sum(0)
    cc = float((rel * rel).sum()) - r * r
    disc = b * b - 4 * a * cc
    t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    ok = (disc >= 0) & (t > 1e-3)
    t = np.where(ok, t, _FAR)

    def normal_at(mask: np.ndarray) -> np.ndarray:
        return ((rel + t[mask] * d[:, mask]) / r).astype(np.float32)

    return t, normal_at


_INTERSECT = {"box": _intersect_box, "cylinder": _intersect_cylinder, "sphere": _intersect_sphere}


# world normal of each room face: floor, wall y=0, wall y=max, wall x=0, wall x=max, ceiling (3 x 6)
_ROOM_NORMALS = np.array([[0, 0, 1], [0, 1, 0], [0, -1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, -1]], np.float32).T
_SALIENT = np.isin(np.arange(256), SALIENT_CLASSES).astype(np.float32)  # class -> saliency lookup


@functools.lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Flattened row and column coordinates of every pixel (float32)."""
    vs, us = np.mgrid[0:height, 0:width].astype(np.float32)
    return vs.ravel(), us.ravel()


@dataclass
class Render:
    """Per-pixel buffers of one rendered view (H x W [x 3])."""

    depth: np.ndarray
    normals_cam: np.ndarray  # 3 x H x W
    semseg: np.ndarray
    instance: np.ndarray
    image: np.ndarray
    accent: np.ndarray  # H x W bool: painted in the surface's accent colour (pattern amount >= 0.5)


def render(scene: Scene, cam: Camera, height: int, width: int, rng: np.random.Generator) -> Render:
    """Ray-cast the scene from the camera."""
    n = height * width
    vs, us = _pixel_grid(height, width)
    d_cam = np.stack([(us - cam.cx) / cam.fx, (vs - cam.cy) / cam.fy, np.ones(n, np.float32)])
    d = (cam.rotation @ d_cam).astype(np.float32)  # world directions with unit forward component: t is z-depth
    o = cam.position

    # the room: the exit point of each ray from the room's box
    t = np.full(n, _FAR, np.float32)
    face = np.zeros(n, np.int64)
    faces = ((2, 0, 5), (1, 1, 2), (0, 3, 4))  # (axis, face at 0, face at max): floor 0, walls 1-4, ceiling 5
    for axis, low_face, high_face in faces:
        da = d[axis]
        safe = np.where(np.abs(da) < _EPS, _EPS, da)
        ta = (np.where(da > 0, scene.room[axis], 0.0) - o[axis]) / safe
        better = ta < t
        t = np.where(better, ta, t)
        face = np.where(better, np.where(da > 0, high_face, low_face), face)
    normal = np.take(_ROOM_NORMALS, face, axis=1)
    instance = face

    # the furniture, each on the pixel rectangle it can cover
    t2 = t.reshape(height, width)
    normal2 = normal.reshape(3, height, width)
    inst2 = instance.reshape(height, width)
    d2 = d.reshape(3, height, width)
    for prim, rect in zip(scene.primitives, _screen_rects(scene.primitives, cam, height, width)):
        if rect is None:
            continue
        y0, y1, x0, x1 = rect
        sub_d = d2[:, y0:y1, x0:x1].reshape(3, -1)
        tp, normal_at = _INTERSECT[prim.kind](o, sub_d, prim)
        cur = t2[y0:y1, x0:x1]
        closer_flat = tp < cur.ravel()
        if not closer_flat.any():
            continue
        closer = closer_flat.reshape(cur.shape)
        cur[closer] = tp[closer_flat]
        inst2[y0:y1, x0:x1][closer] = prim.instance_id
        normal2[:, y0:y1, x0:x1][:, closer] = normal_at(closer_flat)

    points = o[:, None] + d * t
    normals_cam = (cam.rotation.T @ normal).reshape(3, height, width)
    image, amount = _shade(scene, points, normal, instance, rng)
    semseg = scene.instance_class[instance].reshape(height, width)
    accent = (amount >= 0.5).reshape(height, width)
    return Render(t2.copy(), normals_cam, semseg, inst2.copy(), image.reshape(height, width, 3), accent)


_NOISE = np.random.default_rng(12345).standard_normal(1 << 20, dtype=np.float32)  # a fixed table of sensor noise


def _shade(
    scene: Scene, points: np.ndarray, normal: np.ndarray, instance: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Textured Lambertian shading with sensor noise: N x 3 uint8 (points, normal: 3 x N), and the
    per-pixel pattern amount in [0, 1] (0: base colour, 1: accent colour)."""
    n = points.shape[1]
    tex = np.take(scene.textures, instance, axis=1)  # per-pixel texture parameters, K x N
    base, accent, mix, freq, axis = tex[0:3], tex[3:6], tex[6:10], tex[10], tex[11:14]
    coord = (points * axis).sum(0) * freq
    stripes = (np.sin(coord) > 0).astype(np.float32)
    cells = np.floor(points * (freq * np.float32(0.3))).sum(0)
    checker = (cells.astype(np.int32) & 1).astype(np.float32)
    waves = 0.5 + 0.5 * np.sin(coord * np.float32(0.5) + 2.0 * np.sin(points[2] * freq * np.float32(0.25)))
    amount = mix[1] * stripes + mix[2] * checker + mix[3] * waves
    albedo = base + (accent - base) * amount

    light = np.full(n, 0.12, np.float32)
    for pos, power in zip(scene.lights, scene.light_power):
        to_light = pos[:, None] - points
        dist2 = (to_light * to_light).sum(0)
        cos = (to_light * normal).sum(0) / np.sqrt(dist2)
        light += power * np.maximum(cos, 0) / (1.0 + dist2)
    rgb = np.sqrt(np.clip(albedo * light, 0.0, 1.0)) * np.float32(255.0)  # gamma 2
    start = int(rng.integers(0, _NOISE.size - 3 * n))
    rgb += _NOISE[start : start + 3 * n].reshape(3, n) * np.float32(3.0)  # sensor noise
    return np.clip(rgb, 0, 255).astype(np.uint8).T, amount


def boundaries(depth: np.ndarray, normals: np.ndarray, instance: np.ndarray, depth_jump: float = 0.06, normal_angle: float = 30.0) -> np.ndarray:
    """Boundary map (float32 H x W in {0, 1}): instance changes, relative depth jumps and creases.

    `normals` is 3 x H x W (channel first).

    A pixel is a boundary when it differs from its right or lower neighbour by instance, by a
    depth ratio above 1 + depth_jump, or by a normal angle above `normal_angle` degrees.
    """
    edge = np.zeros(depth.shape, bool)
    cos_limit = math.cos(math.radians(normal_angle))
    for sl_a, sl_b in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))), ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):
        da, db = depth[sl_a], depth[sl_b]
        jump = np.abs(da - db) > depth_jump * np.minimum(da, db)
        crease = (normals[(slice(None), *sl_a)] * normals[(slice(None), *sl_b)]).sum(0) < cos_limit
        edge[sl_a] |= (instance[sl_a] != instance[sl_b]) | jump | crease
    return edge.astype(np.float32)


def generate(seed: int, index: int, height: int = 128, width: int = 160) -> dict[str, Any]:
    """One raw synthetic sample (see mtvision.data.sample), a pure function of its arguments."""
    rng = np.random.default_rng([seed, index])
    scene = make_scene(rng)
    cam = make_camera(rng, scene, height, width)
    view = render(scene, cam, height, width, rng)
    return {
        "image": view.image,
        "semseg": view.semseg.astype(np.uint8),
        "depth": view.depth.astype(np.float32),
        "normals": np.ascontiguousarray(view.normals_cam.transpose(1, 2, 0), dtype=np.float32),
        "edge": boundaries(view.depth, view.normals_cam, view.instance),
        "saliency": _SALIENT[view.semseg],
        "texture": view.accent.astype(np.uint8),
        "meta": {"id": f"{seed:04d}_{index:06d}", "size": (height, width), "intrinsics": intrinsics_matrix(cam.fx, cam.fy, cam.cx, cam.cy)},
    }


SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
"""Seed offset of each named split (other names hash to their own offset)."""


class SyntheticScenes(MultiTaskDataset):
    """`num_samples` procedural indoor scenes at height x width; sample i is `generate(seed, i)`."""

    available_tasks: ClassVar[tuple[str, ...]] = ("semseg", "depth", "normals", "edge", "saliency", "texture")
    default_tasks: ClassVar[tuple[str, ...]] = ("semseg", "depth", "normals", "edge", "saliency")  # texture on request
    num_classes: ClassVar[dict[str, int]] = {"semseg": len(CLASS_NAMES), "texture": 2}
    class_names: ClassVar[tuple[str, ...]] = CLASS_NAMES
    boundary_tolerance: ClassVar[float] = 0.011

    def __init__(
        self,
        num_samples: int,
        height: int = 128,
        width: int = 160,
        seed: int = 0,
        tasks: Sequence[str] | None = None,
        transform: RawTransform | None = None,
    ) -> None:
        super().__init__(tasks, transform)
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if height < 8 or width < 8:
            raise ValueError(f"height and width must be at least 8 pixels, got {height} x {width}")
        self.num_samples, self.height, self.width, self.seed = num_samples, height, width, seed

    @classmethod
    def from_config(cls, cfg: Any, split: str, transform: RawTransform | None = None) -> SyntheticScenes:
        """`cfg.num_samples[split]` scenes at the training size; each split has its own seed."""
        offset = SPLIT_SEEDS.get(split, 3 + sum(map(ord, split)))
        return cls(cfg.num_samples[split], cfg.height, cfg.width, seed=1000 * cfg.seed + offset, tasks=cfg.tasks, transform=transform)

    def __len__(self) -> int:
        return self.num_samples

    def sample_id(self, index: int) -> str:
        return f"{self.seed:04d}_{index:06d}"

    def load_raw(self, index: int) -> dict[str, Any]:
        raw = generate(self.seed, index, self.height, self.width)
        return {k: v for k, v in raw.items() if k in self.tasks or k in ("image", "meta")}

    def __repr__(self) -> str:
        return f"SyntheticScenes(num_samples={self.num_samples}, size={self.height}x{self.width}, seed={self.seed}, tasks={list(self.tasks)})"
