"""Point-cloud scenes: a procedural (SYNTHETIC) indoor-room generator, readers for the real formats
users bring (ScanNet .ply, S3DIS Annotations/*.txt, SemanticKITTI .bin/.label), and voxelisation.

The generator exists because no labelled indoor scans ship with this package or can be
downloaded here. Its rooms are boxes and slabs, not scans: numbers measured on them say how an
attack behaves on a sparse network, not what it scores on ScanNet or S3DIS.

Every loader returns a :class:`PointCloud`: coordinates in metres (N, 3) float32, per-point
features (N, C) float32 (RGB in [0, 1]; remission for SemanticKITTI), labels (N,) int64 with
``IGNORE_LABEL`` (-1) for unlabelled points, and the class names the labels index.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import DynattackError

IGNORE_LABEL = -1

SYNTHETIC_CLASSES = ("floor", "wall", "door", "table", "chair", "cabinet", "bed", "sofa")

# ScanNet v2 benchmark: 20 classes given by their NYU40 ids (the `label` of *_vh_clean_2.labels.ply).
SCANNET20_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
    "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink", "bathtub", "otherfurniture",
)
SCANNET20_NYU40_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)

S3DIS_CLASSES = (
    "ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair", "sofa", "bookcase",
    "board", "clutter",
)
_S3DIS_ALIASES = {"stairs": "clutter"}  # a handful of rooms annotate stairs; the 13-class benchmark folds them in

# SemanticKITTI: raw semantic id (lower 16 bits of a .label entry) -> 19 training classes (the
# dataset's semantic-kitti.yaml learning_map; moving objects fold into their static class).
SEMANTICKITTI_CLASSES = (
    "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist", "motorcyclist", "road",
    "parking", "sidewalk", "other-ground", "building", "fence", "vegetation", "trunk", "terrain", "pole",
    "traffic-sign",
)
_KITTI_LEARNING_MAP = {
    10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8, 40: 9, 44: 10, 48: 11, 49: 12,
    50: 13, 51: 14, 60: 9, 70: 15, 71: 16, 72: 17, 80: 18, 81: 19,
    252: 1, 253: 7, 254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5,
}  # everything else (unlabeled, outlier, other-structure, other-object) -> ignored


class PointCloud(NamedTuple):
    coords: torch.Tensor  # (N, 3) float32 metres
    feats: torch.Tensor  # (N, C) float32: RGB in [0, 1], or (N, 1) remission for SemanticKITTI
    labels: torch.Tensor  # (N,) int64 into class_names, IGNORE_LABEL where unlabelled
    class_names: tuple[str, ...]

    @property
    def colors(self) -> torch.Tensor:
        return self.feats


def _cloud(coords, feats, labels, class_names) -> PointCloud:
    return PointCloud(
        torch.from_numpy(np.ascontiguousarray(coords, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        tuple(class_names),
    )


# ---------------------------------------------------------------- voxelisation

class Voxels(NamedTuple):
    coords: torch.Tensor  # (M, 3) int64 voxel indices floor(x / voxel_size), sorted lexicographically
    inverse: torch.Tensor  # (N,) int64 voxel row of each point
    feats: torch.Tensor | None  # (M, C) mean feature of the points in each voxel (None if none given)


def voxelize(coords: torch.Tensor, voxel_size: float, feats: torch.Tensor | None = None) -> Voxels:
    """Hard voxelisation: unique ``floor(x / voxel_size)``, point -> voxel index, mean features."""
    if voxel_size <= 0:
        raise DynattackError(f"voxel size must be positive, got {voxel_size}")
    if coords.dim() != 2 or coords.shape[1] != 3:
        raise DynattackError(f"point coordinates must have shape (N, 3), got {tuple(coords.shape)}")
    # float64 so that the floor does not depend on float32 rounding of large coordinates.
    cells = torch.floor(coords.double() / voxel_size).long()
    unique, inverse = torch.unique(cells, dim=0, return_inverse=True)
    mean = None
    if feats is not None:
        if feats.shape[0] != coords.shape[0]:
            raise DynattackError(f"{feats.shape[0]} feature rows for {coords.shape[0]} points")
        count = torch.bincount(inverse, minlength=len(unique)).to(feats.dtype)
        mean = feats.new_zeros(len(unique), feats.shape[1]).index_add_(0, inverse, feats) / count[:, None]
    return Voxels(unique, inverse, mean)


# ---------------------------------------------------------------- synthetic rooms

_BASE_COLOURS = {
    "floor": (0.55, 0.45, 0.35), "wall": (0.85, 0.83, 0.78), "door": (0.60, 0.42, 0.26),
    "table": (0.52, 0.36, 0.22), "chair": (0.32, 0.32, 0.36), "cabinet": (0.72, 0.62, 0.46),
    "bed": (0.74, 0.74, 0.84), "sofa": (0.46, 0.27, 0.26),
}
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
# The rooms are procedural, so any number could be generated: each split is fixed at the size the
# shipped unet3d-rooms was trained and evaluated with (its model card), which bounds the work and
# memory a request can ask for (a room is ~3 MB once packed and takes ~35 ms to generate).
SYNTHETIC_SPLIT_SIZES = {"train": 180, "val": 8, "test": 8}


class _Part(NamedTuple):
    """An axis-aligned box in an object's local frame (metres; z up from the floor)."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]


def _box_surface(rng, part: _Part, density: float) -> np.ndarray:
    """Uniform points on the faces of a box (bottom face skipped when it rests on the floor)."""
    lo, hi = np.array(part.lo), np.array(part.hi)
    pts = []
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        area = (hi[u] - lo[u]) * (hi[v] - lo[v])
        for side in (lo[axis], hi[axis]):
            if axis == 2 and side == lo[2] and lo[2] <= 0.0:
                continue
            n = rng.poisson(area * density)
            p = np.empty((n, 3))
            p[:, axis] = side
            p[:, u] = rng.uniform(lo[u], hi[u], n)
            p[:, v] = rng.uniform(lo[v], hi[v], n)
            pts.append(p)
    return np.concatenate(pts) if pts else np.zeros((0, 3))


def _furniture_parts(rng, kind: str) -> tuple[list[_Part], float, float]:
    """Parts of one piece of furniture in its local frame (back at y = depth), width, depth."""
    if kind == "table":
        w, d, h = rng.uniform(0.8, 1.6), rng.uniform(0.6, 1.0), rng.uniform(0.72, 0.77)
        leg = 0.05
        parts = [_Part((0, 0, h - 0.04), (w, d, h))]
        parts += [_Part((x, y, 0), (x + leg, y + leg, h - 0.04)) for x in (0.03, w - leg - 0.03) for y in (0.03, d - leg - 0.03)]
    elif kind == "chair":
        w = d = rng.uniform(0.42, 0.5)
        seat, back = rng.uniform(0.44, 0.48), rng.uniform(0.4, 0.5)
        leg = 0.03
        parts = [_Part((0, 0, seat - 0.04), (w, d, seat)), _Part((0, d - 0.03, seat), (w, d, seat + back))]
        parts += [_Part((x, y, 0), (x + leg, y + leg, seat - 0.04)) for x in (0, w - leg) for y in (0, d - leg)]
    elif kind == "cabinet":
        w, d, h = rng.uniform(0.5, 1.2), rng.uniform(0.4, 0.6), rng.uniform(0.8, 2.0)
        parts = [_Part((0, 0, 0), (w, d, h))]
    elif kind == "bed":
        w, d = rng.uniform(0.9, 1.8), rng.uniform(1.9, 2.1)
        mattress, head = rng.uniform(0.45, 0.6), rng.uniform(0.9, 1.1)
        parts = [_Part((0, 0, 0), (w, d - 0.06, mattress)), _Part((0, d - 0.06, 0), (w, d, head))]
    elif kind == "sofa":
        w, d = rng.uniform(1.6, 2.4), rng.uniform(0.8, 1.0)
        seat, back, arm = rng.uniform(0.4, 0.45), rng.uniform(0.8, 0.9), rng.uniform(0.15, 0.25)
        parts = [_Part((arm, 0, 0), (w - arm, d - 0.2, seat)), _Part((0, d - 0.2, 0), (w, d, back)),
                 _Part((0, 0, 0), (arm, d - 0.2, 0.6)), _Part((w - arm, 0, 0), (w, d - 0.2, 0.6))]
    else:
        raise ValueError(kind)
    return parts, w, d


def _wall_pose(rng, wall: int, w: float, d: float, room) -> tuple[float, float, float] | None:
    """Pose whose local back (y = depth) touches ``wall`` (0: y=D, 1: x=0, 2: y=0, 3: x=W)."""
    W, D = room
    length = W if wall % 2 == 0 else D
    if length < w + 0.4:
        return None
    t = rng.uniform(0.2 + w / 2, length - 0.2 - w / 2)
    yaw = (0.0, np.pi / 2, np.pi, -np.pi / 2)[wall]  # local +y (the back) points at the wall
    cx, cy = {0: (t, D - d / 2), 1: (d / 2, t), 2: (t, d / 2), 3: (W - d / 2, t)}[wall]
    return cx, cy, yaw


def _table_side_pose(rng, table, d: float) -> tuple[float, float, float]:
    """Pose in front of a random side of ``table`` (cx, cy, yaw, w, d), back away from it."""
    tx, ty, tyaw, tw, td = table
    side = rng.integers(4)
    yaw = tyaw + side * np.pi / 2
    reach = (td if side % 2 == 0 else tw) / 2 + d / 2 - rng.uniform(0.0, 0.15)  # slightly tucked in
    return tx - np.sin(yaw) * reach, ty + np.cos(yaw) * reach, yaw


def _place(rng, kind: str, room, taken: list, table=None):
    """Parts and pose of one object kept clear of ``taken`` (x, y, radius) footprints, or None.

    Cabinets, beds and sofas stand with their back to a wall, tables anywhere, chairs at a side
    of ``table`` facing it (allowed to overlap that table).
    """
    W, D = room
    parts, w, d = _furniture_parts(rng, kind)
    radius = 0.5 * np.hypot(w, d)
    for _ in range(50):
        if kind in ("cabinet", "bed", "sofa"):
            pose = _wall_pose(rng, int(rng.integers(4)), w, d, room)
        elif kind == "chair":
            pose = _table_side_pose(rng, table, d)
            if not (radius <= pose[0] <= W - radius and radius <= pose[1] <= D - radius):
                continue
        elif W > 2 * radius + 0.2 and D > 2 * radius + 0.2:
            pose = (rng.uniform(radius + 0.1, W - radius - 0.1), rng.uniform(radius + 0.1, D - radius - 0.1),
                    rng.uniform(0, 2 * np.pi))
        else:
            pose = None
        if pose is None:
            return None
        cx, cy, yaw = pose
        clear = all(np.hypot(cx - ox, cy - oy) >= 0.8 * (radius + r)
                    for ox, oy, r in taken if table is None or (ox, oy) != table[:2])
        if clear:
            taken.append((cx, cy, radius))
            return parts, w, d, cx, cy, yaw
    return None


def _to_world(points: np.ndarray, w: float, d: float, cx: float, cy: float, yaw: float) -> np.ndarray:
    """Local frame (x in [0, w], y in [0, d]) -> room: centre at (cx, cy), turned by yaw about z."""
    local = points - np.array([w / 2, d / 2, 0.0])
    c, s = np.cos(yaw), np.sin(yaw)
    out = local.copy()
    out[:, 0] = c * local[:, 0] - s * local[:, 1] + cx
    out[:, 1] = s * local[:, 0] + c * local[:, 1] + cy
    return out


def _on_wall(wall: int, t: np.ndarray, e: np.ndarray, z: np.ndarray, room) -> np.ndarray:
    """Points at position t along ``wall``, e metres in front of it (into the room), height z."""
    W, D = room
    x, y = {0: (t, D - e), 1: (e, t), 2: (t, e), 3: (W - e, t)}[wall]
    return np.stack([x, y, z], axis=1)


def _rect(rng, density, a: tuple[float, float], b: tuple[float, float]):
    """Uniform samples of a rectangle [a0, a1] x [b0, b1] at ``density`` points per m^2."""
    n = rng.poisson(max(a[1] - a[0], 0) * max(b[1] - b[0], 0) * density)
    return rng.uniform(a[0], a[1], n), rng.uniform(b[0], b[1], n)


def _walls_and_door(rng, room, height, density):
    """Four inward-facing walls, one with a doorway: a recessed closed door or an open one."""
    W, D = room
    door_wall = int(rng.integers(4))
    length = W if door_wall % 2 == 0 else D
    dw, dh = rng.uniform(0.8, 1.0), rng.uniform(2.0, 2.1)
    t0 = rng.uniform(0.3, length - dw - 0.3)
    walls = []
    for wall in range(4):
        t, z = _rect(rng, density, (0, W if wall % 2 == 0 else D), (0, height))
        if wall == door_wall:
            keep = ~((t >= t0) & (t <= t0 + dw) & (z <= dh))
            t, z = t[keep], z[keep]
        walls.append(_on_wall(wall, t, np.zeros_like(t), z, room))
    door = []
    if rng.random() < 0.5:  # closed: panel 3 cm behind the wall plane, with jambs and head
        t, z = _rect(rng, density, (t0, t0 + dw), (0, dh))
        door.append(_on_wall(door_wall, t, np.full_like(t, -0.03), z, room))
        for edge in (t0, t0 + dw):
            e, z = _rect(rng, density, (-0.03, 0), (0, dh))
            door.append(_on_wall(door_wall, np.full_like(e, edge), e, z, room))
        t, e = _rect(rng, density, (t0, t0 + dw), (-0.03, 0))
        door.append(_on_wall(door_wall, t, e, np.full_like(t, dh), room))
    else:  # open into the room: a 4 cm panel standing on its hinge, perpendicular to the wall
        for face in (t0, t0 + 0.04):
            e, z = _rect(rng, density, (0, dw), (0, dh))
            door.append(_on_wall(door_wall, np.full_like(e, face), e, z, room))
    centre = _on_wall(door_wall, np.array([t0 + dw / 2]), np.array([0.0]), np.array([0.0]), room)[0]
    return np.concatenate(walls), np.concatenate(door), (centre[0], centre[1], dw / 2 + 0.4)


def _instance_colour(rng, name: str, n: int) -> np.ndarray:
    """Class base colour, shifted per instance, with a little per-point variation."""
    instance = np.clip(np.array(_BASE_COLOURS[name]) + rng.normal(0, 0.08, 3), 0, 1)
    return np.clip(instance + rng.normal(0, 0.03, (n, 3)), 0, 1)


def generate_scene(seed: int | np.random.Generator = 0, *, density: float = 2000.0, noise: float = 0.005,
                   scanner_ref: float = 1.5) -> PointCloud:
    """One SYNTHETIC room with classes ``SYNTHETIC_CLASSES``, in metres, floor at z = 0.

    A 3.5-7 m x 3.5-7 m room (2.5-3 m high): floor, four walls, a door (closed or open), a bed
    and/or a sofa, 1-2 cabinets against walls, 1-2 tables with 1-4 chairs each. Surfaces are
    sampled at ``density`` points/m^2, then thinned like a scan: a point at distance r from a
    virtual scanner (random spot, 1.2-1.6 m high) is kept with probability min(1, (scanner_ref/r)^2).
    Gaussian noise (``noise`` m per axis) is added; colours vary by class, instance and point.
    Occlusion is not modelled. Typically 70k-110k points (60k-80k voxels at 2 cm). Deterministic for a given seed.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    room = (rng.uniform(3.5, 7.0), rng.uniform(3.5, 7.0))
    height = rng.uniform(2.5, 3.0)
    chunks: list[tuple[np.ndarray, str]] = []

    x, y = _rect(rng, density, (0, room[0]), (0, room[1]))
    chunks.append((np.stack([x, y, np.zeros_like(x)], axis=1), "floor"))
    walls, door, door_zone = _walls_and_door(rng, room, height, density)
    chunks += [(walls, "wall"), (door, "door")]

    taken = [door_zone]  # keep the doorway clear
    big = [k for k in ("bed", "sofa") if rng.random() < 0.6] or [("bed", "sofa")[int(rng.integers(2))]]
    for kind in big + ["cabinet"] * int(rng.integers(1, 3)) + ["table"] * int(rng.integers(1, 3)):
        placed = _place(rng, kind, room, taken)
        if placed is None:
            continue
        parts, w, d, cx, cy, yaw = placed
        chunks.append((_to_world(np.concatenate([_box_surface(rng, p, density) for p in parts]), w, d, cx, cy, yaw), kind))
        if kind == "table":
            for _ in range(int(rng.integers(1, 5))):
                chair = _place(rng, "chair", room, taken, table=(cx, cy, yaw, w, d))
                if chair is not None:
                    cparts, cw, cd, ccx, ccy, cyaw = chair
                    pts = np.concatenate([_box_surface(rng, p, density) for p in cparts])
                    chunks.append((_to_world(pts, cw, cd, ccx, ccy, cyaw), "chair"))

    scanner = np.array([rng.uniform(0.5, room[0] - 0.5), rng.uniform(0.5, room[1] - 0.5), rng.uniform(1.2, 1.6)])
    coords, colours, labels = [], [], []
    for pts, name in chunks:
        r = np.linalg.norm(pts - scanner, axis=1)
        pts = pts[rng.random(len(pts)) < np.minimum(1.0, (scanner_ref / np.maximum(r, 1e-6)) ** 2)]
        coords.append(pts + rng.normal(0, noise, pts.shape))
        colours.append(_instance_colour(rng, name, len(pts)))
        labels.append(np.full(len(pts), SYNTHETIC_CLASSES.index(name)))
    order = rng.permutation(sum(len(c) for c in coords))  # point order carries no class information
    return _cloud(np.concatenate(coords)[order], np.concatenate(colours)[order], np.concatenate(labels)[order],
                  SYNTHETIC_CLASSES)


def synthetic_scenes(split: str = "val", n: int = 8, seed: int = 0, **kwargs) -> list[PointCloud]:
    """The first ``n`` SYNTHETIC rooms of ``split`` (train / val / test), at most
    ``SYNTHETIC_SPLIT_SIZES[split]``; scene i depends only on (split, seed, i), so the
    validation set is fixed and a longer list extends a shorter one."""
    if split not in _SPLIT_CODES:
        raise DynattackError(f"unknown split {split!r}; expected one of {', '.join(_SPLIT_CODES)}")
    size = SYNTHETIC_SPLIT_SIZES[split]
    if not 0 <= n <= size:
        raise DynattackError(f"asked for {n} rooms of the synthetic {split} split, which holds {size} "
                             "(a fixed size: dynattack.data.points.SYNTHETIC_SPLIT_SIZES)")
    return [generate_scene(np.random.default_rng([_SPLIT_CODES[split], seed, i]), **kwargs) for i in range(n)]


# ---------------------------------------------------------------- PLY (ScanNet)

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_PLY_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}


def _ply_header(data: bytes, path: Path):
    """(format, [(element, count, [(property, numpy type) or (property, None) for lists])], body offset)."""
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise DynattackError(f"{path} is not a PLY file (no 'ply' magic or no end_header)")
    body = data.index(b"\n", end) + 1
    fmt, elements = None, []
    for line in data[:end].decode("ascii", "replace").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            if words[1] == "list":
                elements[-1][2].append((words[4], None))
            elif words[1] in _PLY_TYPES:
                elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
            else:
                raise DynattackError(f"{path}: unknown PLY property type {words[1]!r}")
    if fmt not in _PLY_FORMATS:
        raise DynattackError(f"{path}: unsupported PLY format {fmt!r}; expected ascii or binary")
    return fmt, elements, body


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Vertex properties of a PLY file (ascii, binary little or big endian) by name.

    Only the ``vertex`` element is read; elements before it must not hold list properties
    (true of ScanNet and of every common exporter, which write vertices first).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DynattackError(f"cannot read PLY file {path}: {exc.strerror}") from None
    fmt, elements, body = _ply_header(data, path)
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise DynattackError(f"{path}: PLY file has no vertex element")
    before, (_, count, props) = elements[: names.index("vertex")], elements[names.index("vertex")]
    if any(t is None for e in elements[: names.index("vertex") + 1] for _, t in e[2]):
        raise DynattackError(f"{path}: list properties before or in the vertex element are not supported")
    try:
        if fmt == "ascii":
            lines = data[body:].decode("ascii").splitlines()
            skip = sum(e[1] for e in before)
            values = np.array(" ".join(lines[skip: skip + count]).split(), dtype=np.float64)
            table = values.reshape(count, len(props))
            return {name: table[:, i].astype(t) for i, (name, t) in enumerate(props)}
        order = _PLY_FORMATS[fmt]
        offset = body + sum(e[1] * sum(np.dtype(t).itemsize for _, t in e[2]) for e in before)
        dtype = np.dtype([(name, order + t) for name, t in props])
        table = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        return {name: table[name].astype(table[name].dtype.newbyteorder("=")) for name, _ in props}
    except (ValueError, UnicodeDecodeError) as exc:
        raise DynattackError(f"{path}: truncated or malformed PLY vertex data ({exc})") from None


def _scannet_labels_path(path: Path) -> Path | None:
    """ScanNet v2 keeps labels beside the mesh: scene_vh_clean_2.ply -> scene_vh_clean_2.labels.ply."""
    if path.name.endswith(".ply") and not path.name.endswith(".labels.ply"):
        candidate = path.with_name(path.name[: -len(".ply")] + ".labels.ply")
        if candidate.is_file():
            return candidate
    return None


def nyu40_to_scannet20(raw: np.ndarray) -> np.ndarray:
    """NYU40 ids -> indices into SCANNET20_CLASSES, IGNORE_LABEL for the other ids."""
    lut = np.full(max(SCANNET20_NYU40_IDS) + 1, IGNORE_LABEL, dtype=np.int64)
    lut[list(SCANNET20_NYU40_IDS)] = np.arange(len(SCANNET20_NYU40_IDS))
    raw = raw.astype(np.int64)
    return np.where((raw >= 0) & (raw < len(lut)), lut[np.clip(raw, 0, len(lut) - 1)], IGNORE_LABEL)


def load_scannet_scene(path: str | Path, labels_path: str | Path | None = None, raw_labels: bool = False) -> PointCloud:
    """A ScanNet scene from its ``.ply`` (vertices x, y, z, red, green, blue).

    Labels come from ``labels_path``, else from a ``label`` vertex property of the file itself,
    else from the ScanNet v2 sibling ``<name>.labels.ply``; without any, every point is
    IGNORE_LABEL. NYU40 ids map to the 20 benchmark classes (``raw_labels=True`` keeps the ids,
    with no class names).
    """
    path = Path(path)
    v = read_ply(path)
    missing = [k for k in ("x", "y", "z", "red", "green", "blue") if k not in v]
    if missing:
        raise DynattackError(f"{path}: PLY vertices lack {', '.join(missing)}")
    coords = np.stack([v["x"], v["y"], v["z"]], axis=1)
    colours = np.stack([v["red"], v["green"], v["blue"]], axis=1).astype(np.float32) / 255.0
    if labels_path is not None:
        raw = read_ply(labels_path).get("label")
        if raw is None:
            raise DynattackError(f"{labels_path}: PLY vertices have no 'label' property")
    elif "label" in v:
        raw = v["label"]
    else:
        sibling = _scannet_labels_path(path)
        raw = read_ply(sibling).get("label") if sibling else None
    if raw is None:
        labels = np.full(len(coords), IGNORE_LABEL)
    elif len(raw) != len(coords):
        raise DynattackError(f"{path}: {len(raw)} labels for {len(coords)} vertices")
    else:
        labels = raw.astype(np.int64) if raw_labels else nyu40_to_scannet20(raw)
    return _cloud(coords, colours, labels, () if raw_labels else SCANNET20_CLASSES)


# ---------------------------------------------------------------- S3DIS

def _read_xyzrgb(path: Path) -> np.ndarray:
    """(n, 6) rows of 'x y z r g b'; stray non-numeric bytes (one S3DIS file has some) are dropped."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise DynattackError(f"cannot read {path}: {exc.strerror}") from None
    try:
        values = np.array(text.split(), dtype=np.float64)
    except ValueError:
        values = np.array(re.sub(r"[^0-9eE+\-.\s]", "", text).split(), dtype=np.float64)
    if values.size % 6:
        raise DynattackError(f"{path}: expected lines of 'x y z r g b', got {values.size} numbers")
    return values.reshape(-1, 6)


def load_s3dis_room(room_dir: str | Path) -> PointCloud:
    """An S3DIS room from ``<room>/Annotations/<class>_<k>.txt`` files (class from the file name)."""
    room_dir = Path(room_dir)
    files = sorted((room_dir / "Annotations").glob("*.txt"))
    if not files:
        raise DynattackError(f"no S3DIS annotation files in {room_dir / 'Annotations'} (expected <class>_<k>.txt)")
    coords, colours, labels = [], [], []
    for f in files:
        name = f.stem.rsplit("_", 1)[0].lower()
        name = _S3DIS_ALIASES.get(name, name)
        if name not in S3DIS_CLASSES:
            raise DynattackError(f"{f}: unknown S3DIS class {name!r}; expected one of {', '.join(S3DIS_CLASSES)}")
        rows = _read_xyzrgb(f)
        coords.append(rows[:, :3])
        colours.append(rows[:, 3:] / 255.0)
        labels.append(np.full(len(rows), S3DIS_CLASSES.index(name)))
    return _cloud(np.concatenate(coords), np.concatenate(colours), np.concatenate(labels), S3DIS_CLASSES)


def s3dis_rooms(root: str | Path, areas=(1, 2, 3, 4, 5, 6)) -> list[Path]:
    """Room directories ``root/Area_N/<room>`` (with an Annotations folder) of the given areas, sorted."""
    root = Path(root)
    rooms = sorted(p.parent for a in areas for p in (root / f"Area_{a}").glob("*/Annotations") if p.is_dir())
    if not rooms:
        raise DynattackError(f"no S3DIS rooms under {root} for areas {list(areas)} (expected Area_N/<room>/Annotations)")
    return rooms


# ---------------------------------------------------------------- SemanticKITTI

def kitti_learning_map(raw: np.ndarray) -> np.ndarray:
    """Raw SemanticKITTI semantic ids -> indices into SEMANTICKITTI_CLASSES, IGNORE_LABEL otherwise."""
    lut = np.full(2**16, IGNORE_LABEL, dtype=np.int64)
    for raw_id, train_id in _KITTI_LEARNING_MAP.items():
        lut[raw_id] = train_id - 1
    return lut[raw]


def load_semantickitti_scan(bin_path: str | Path, label_path: str | Path | None = None,
                            raw_labels: bool = False) -> PointCloud:
    """A SemanticKITTI scan: ``velodyne/NNNNNN.bin`` (float32 x, y, z, remission) and its
    ``labels/NNNNNN.label`` (uint32: lower 16 bits semantic id, upper 16 instance id), found
    beside the velodyne folder when ``label_path`` is not given (no file: all IGNORE_LABEL).
    Features are the remission (N, 1); labels map to the 19 training classes unless ``raw_labels``.
    """
    bin_path = Path(bin_path)
    try:
        scan = np.fromfile(bin_path, dtype="<f4")
    except OSError as exc:
        raise DynattackError(f"cannot read SemanticKITTI scan {bin_path}: {exc.strerror}") from None
    if scan.size % 4:
        raise DynattackError(f"{bin_path}: size is not a multiple of 16 bytes (float32 x, y, z, remission)")
    scan = scan.reshape(-1, 4)
    if label_path is None:
        guess = bin_path.parent.parent / "labels" / (bin_path.stem + ".label")
        label_path = guess if guess.is_file() else None
    if label_path is None:
        labels = np.full(len(scan), IGNORE_LABEL)
    else:
        try:
            raw = np.fromfile(label_path, dtype="<u4")
        except OSError as exc:
            raise DynattackError(f"cannot read SemanticKITTI labels {label_path}: {exc.strerror}") from None
        if len(raw) != len(scan):
            raise DynattackError(f"{label_path}: {len(raw)} labels for {len(scan)} points in {bin_path}")
        semantic = (raw & 0xFFFF).astype(np.int64)
        labels = semantic if raw_labels else kitti_learning_map(semantic)
    return _cloud(scan[:, :3], scan[:, 3:], labels, () if raw_labels else SEMANTICKITTI_CLASSES)
