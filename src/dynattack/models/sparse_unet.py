"""A MinkowskiNet-style residual sparse U-Net for point-cloud segmentation, with voxelisation as gates.

**Input / output.** Points in the batch format of :mod:`dynattack.data.point_batch`:
``(B, N, 3 + C + 1)`` = x, y, z in metres, C per-point features (RGB), a real-point flag (padding
rows, flag 0, are ignored). Output: per-point logits ``(B, num_classes, N)`` (class dimension 1,
as ``F.cross_entropy`` takes them); padding rows get zeros.

**Network.** Stem 3x3x3 conv, then per level (strides 1, 2, 4, 8 for widths 16-32-64-128) one
residual BasicBlock; down by 2x2x2 stride-2 convolutions, up by 2x2x2 transposed convolutions
with the encoder's features concatenated (a BasicBlock with a 1x1 projection shortcut each);
a per-voxel linear classifier; each point reads its voxel's logits. Every conv is followed by
BatchNorm (ReLU where MinkowskiNet has one).

**Voxelisation is the gate.** A point's voxel is ``floor(x / l)`` (``l`` = ``voxel_size``). The
units of the stride-1 gate are the *candidate* voxels: each point's own voxel and those of its 26
neighbours it could enter in one step, i.e. within ``reach`` metres (L-inf distance from the
point to the voxel's box; the paper's extension of M voxels to M'). The default ``reach = l / 4``
is the default I-FGSM step at eps = 2 l: on the synthetic rooms M' ~ 2.7 M and an LGM step costs
~3x an FGM step; ``reach = l`` takes all 26 neighbours (M' ~ 9 M, ~11x). Set ``model.reach``.
For a (point, candidate) pair, ``d = x / l - (v + 0.5)`` is the point relative to the
candidate's centre, in voxel units.

- decision: the candidate is some point's own voxel (exactly the standard voxelisation);
- logit ``q`` = max over its points of ``0.5 - max_i |d_i|``, the signed L-inf distance of the
  nearest point to the voxel's box (positive inside); ``q >= 0`` agrees with the decision except
  for points exactly on a face. Value ``G = sigmoid(q)``, ``tau = 0.5``;
- relation ``r`` (soft modes; ``relation=``): ``sigmoid`` (the paper's Eq. 30)
  ``prod_i 1 / (1 + exp(lam (|d_i| - 0.5)))``, slope ``lam`` = the gate's LGM slope;
  ``bilinear`` ``prod_i max(0, 1 - |d_i|)`` (trilinear interpolation between voxel centres);
  ``rbf`` ``2 ** (-4 |d|^2)``, a Gaussian equal to 0.5 at a face centre like the other two.
  The paper's Table VII compares the three; ``lam`` shapes only the sigmoid;
- soft occupancy ``o = 1 - prod(1 - r)`` over the candidate's pairs (Eq. 31).

The coarser levels have one gate each (``occupancy.s2`` ...) over the parents of the finer
level's candidates: decision = some child occupied, logit = the children's max, soft occupancy
``1 - prod(1 - o_child)``. Per mode (one for all gates, :func:`dynattack.gates.gate_mode`):

- ``hard`` / ``train``: standard voxelisation. The network runs on the occupied voxels only, so
  this forward *is* the real conditional execution (a sparse convolution touches nothing else);
  voxel features = mean of its points' features; occupancy is a constant (FGM).
- ``lgm``: the network runs on every candidate voxel; voxel features = ``o`` x the r-weighted
  mean of the point features; every conv and BN output is multiplied by its level's occupancy;
  a point's logits = its candidates' logits weighted by ``r`` normalised to sum 1 (in the hard
  network that is its own voxel's).
- ``lgm_st``: lgm's graph with each soft quantity (occupancies, feature means, devoxelisation
  weights) replaced by ``hard + (soft - soft.detach())``: the hard network's values, lgm's gradient.
- forced on: every candidate voxel runs (the scene's full network); forced off: none does.

The point features the network averages are the input features plus ``d`` for the point's own
voxel (where in the voxel the surface lies). Through them the coordinates also reach the
network without the occupancy, so FGM has a gradient: with colour alone a hard voxelisation is
piecewise constant in the coordinates and FGM's gradient would be exactly zero. (The paper's
SemanticKITTI networks likewise take coordinates as features.)

**Cost.** Executed FLOPs = the work of the hard network: per level, ``pair_flops`` x the
kernel-map pairs of its 3x3x3 convolutions among occupied voxels, plus ``voxel_flops`` x its
occupied voxels (1x1 projections, the classifier, and the stride-2 and transposed convolutions,
which touch each voxel of the finer level once). Both constants come from the layer shapes
(2 C_in C_out per pair). Each gate event is a :class:`VoxelEvent` carrying its units' pair
counts, so :meth:`SparseUNet.executed_flops` reads the trace alone; the tests check it against
``FlopCounterMode`` on the real forward and against a brute-force count. An event's
``unit_cost`` is an isolated voxel's FLOPs (its share for energy losses). ``cost.calibrate``
sees an empty scene (zeros are padding) and measures nothing: full FLOPs depend on the scene
(run it forced on and read ``executed_flops``).

Events have shape ``(B, U)``, U the batch's largest candidate count; units past a scene's own
are padding (logit ``PAD_LOGIT``, decision off, mask 0, no pairs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..data.points import SYNTHETIC_CLASSES
from ..errors import DynattackError
from ..gates import Gate, GateEvent, Trace, record, tracing
from ..sparse import (
    CoordinateSet,
    SparseBatchNorm,
    SparseConv3d,
    SparseConvTranspose3d,
    SparseTensor,
    cat,
    downsample_occupancy,
    kernel_offsets,
)
from ..sparse import keys as K

RELATIONS = ("sigmoid", "bilinear", "rbf")
PAD_LOGIT = -2.0  # below any candidate's logit (>= -1: a candidate is within one voxel of a point)


def relation(d: torch.Tensor, kind: str, lam: float) -> torch.Tensor:
    """``(Q,)`` soft membership of points in voxels from offsets ``d`` ``(Q, 3)`` (voxel units,
    point minus voxel centre)."""
    if kind == "sigmoid":
        return torch.sigmoid(lam * (0.5 - d.abs())).prod(1)
    if kind == "bilinear":
        return (1 - d.abs()).clamp_min(0).prod(1)
    if kind == "rbf":
        return torch.exp2(-4 * (d * d).sum(1))
    raise DynattackError(f"unknown relation {kind!r}; expected one of {', '.join(RELATIONS)}")


def _st(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Forward value ``hard``, gradient of ``soft``."""
    return hard + (soft - soft.detach())


# --------------------------------------------------------------------------- the gate


@dataclass
class VoxelEvent(GateEvent):
    """A gate event of one voxel level, with what :meth:`SparseUNet.executed_flops` needs."""

    pairs: torch.Tensor  # (B, U) float64: 3x3x3 kernel-map pairs among occupied voxels at each unit
    voxel_flops: float  # FLOPs per occupied voxel of the level, besides its pairs
    pair_flops: float  # FLOPs per kernel-map pair of the level's 3x3x3 convolutions


class OccupancyGate(Gate):
    """Occupancy of the candidate voxels of one level (see the module docstring).

    The model computes the hard decision (forced gates applied, :meth:`decide`), the logit and,
    in soft modes, the soft occupancy; the gate turns them into the mask of its mode and records.
    """

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.name = f"occupancy.s{stride}"
        self.voxel_flops = 0.0  # set by the model from its layer shapes
        self.pair_flops = 0.0

    def decide(self, occupied: torch.Tensor) -> torch.Tensor:
        """The decision the hard network runs: ``occupied``, unless the gate is forced."""
        return occupied if self.force is None else torch.full_like(occupied, self.force == "on")

    def forward(self, logit: torch.Tensor, decision: torch.Tensor, soft: torch.Tensor | None,
                batch: torch.Tensor, size: int, pairs: torch.Tensor | None) -> torch.Tensor:
        """Per-unit ``(n,)`` mask in the current mode. ``batch``: each unit's scene (units sorted
        by scene), ``size``: scenes in the batch, ``pairs``: kernel-map pairs per unit (needed
        only while a trace records)."""
        if self.force is not None or self.mode in ("hard", "train"):
            mask = decision.to(logit.dtype)
        elif self.mode == "lgm":
            mask = soft
        else:
            mask = _st(decision.to(logit.dtype), soft)
        if tracing():
            counts = torch.bincount(batch, minlength=size)
            width = max(int(counts.max()), 1)
            pos = torch.arange(len(batch), device=batch.device) - (torch.cumsum(counts, 0) - counts)[batch]

            def pad(values: torch.Tensor, fill) -> torch.Tensor:
                return values.new_full((size, width), fill).index_put((batch, pos), values)

            padded = pad(logit, PAD_LOGIT)
            record(VoxelEvent(
                name=self.name, logit=padded, value=self.value_fn(padded), tau=self.tau,
                decision=pad(decision, False), mask=pad(mask, 0.0),
                unit_cost=torch.tensor(self.voxel_flops + self.pair_flops, dtype=torch.float64),
                pairs=pad(pairs, 0.0), voxel_flops=self.voxel_flops, pair_flops=self.pair_flops,
            ))
        return mask


# --------------------------------------------------------------------------- layers


def _scale(t: SparseTensor, m: torch.Tensor | None) -> SparseTensor:
    """Multiply by the level's occupancy (``None``: the hard network, where it is 1)."""
    return t if m is None else t.replace(t.F * m[:, None])


def _relu(t: SparseTensor) -> SparseTensor:
    return t.replace(torch.relu(t.F))


class BasicBlock(nn.Module):
    """MinkowskiNet's residual block: two 3x3x3 convs with BN, a 1x1 projection when widths differ."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = SparseConv3d(cin, cout, 3), SparseBatchNorm(cout)
        self.conv2, self.bn2 = SparseConv3d(cout, cout, 3), SparseBatchNorm(cout)
        self.proj = nn.Linear(cin, cout, bias=False) if cin != cout else None
        self.proj_bn = SparseBatchNorm(cout) if cin != cout else None

    def forward(self, x: SparseTensor, m: torch.Tensor | None) -> SparseTensor:
        h = _relu(_scale(self.bn1(_scale(self.conv1(x), m)), m))
        h = _scale(self.bn2(_scale(self.conv2(h), m)), m)
        if self.proj is not None:
            x = _scale(self.proj_bn(_scale(x.replace(self.proj(x.F)), m)), m)
        return _relu(h + x)


# --------------------------------------------------------------------------- voxelisation


class _Points(NamedTuple):
    batch: torch.Tensor  # (P,) scene of each real point
    row: torch.Tensor  # (P,) its row in the input
    u: torch.Tensor  # (P, 3) coordinates in voxel units, attached to the input
    cell: torch.Tensor  # (P, 3) int64 floor(x / l)
    feats: torch.Tensor  # (P, C) input features, attached


class _Pairs(NamedTuple):
    """(point, candidate voxel) pairs and the candidate set they define."""

    point: torch.Tensor  # (Q,)
    voxel: torch.Tensor  # (Q,) row in ``units``
    d: torch.Tensor  # (Q, 3) point minus voxel centre, voxel units, attached
    own: torch.Tensor  # (Q,) bool: the point's own voxel (one per point, in point order)
    units: CoordinateSet  # candidate voxels, sorted by (scene, x, y, z)


@dataclass
class _Level:
    units: CoordinateSet  # the gate's units: candidate voxels at this stride
    occupied: torch.Tensor  # (n,) bool, hard occupancy
    logit: torch.Tensor  # (n,)
    soft: torch.Tensor | None  # (n,) soft occupancy (soft modes)
    compute: CoordinateSet | None = None  # the voxels the network runs on
    rows: torch.Tensor | None = None  # unit row of each compute row (None: the same rows)


class SparseUNet(nn.Module):
    """See the module docstring. ``reach`` (metres, default ``voxel_size / 4``) bounds the candidates."""

    family = "sparse_unet"
    input_dependent_full = True  # the full network is the scene's candidate voxels (cost.full_flops_per_sample)

    def __init__(self, num_classes: int = len(SYNTHETIC_CLASSES), in_features: int = 3,
                 widths: tuple[int, ...] = (16, 32, 64, 128), voxel_size: float = 0.02, relation: str = "sigmoid",
                 reach: float | None = None, class_names: tuple[str, ...] = SYNTHETIC_CLASSES) -> None:
        super().__init__()
        if relation not in RELATIONS:
            raise DynattackError(f"unknown relation {relation!r}; expected one of {', '.join(RELATIONS)}")
        if not voxel_size > 0 or (reach is not None and not reach > 0):
            raise DynattackError("voxel_size and reach must be > 0")
        self.voxel_size = float(voxel_size)
        self.reach = self.voxel_size / 4 if reach is None else float(reach)
        self.relation = relation
        self.num_classes = num_classes
        self.class_names = tuple(class_names)
        self.input_shape = (1, 3 + in_features + 1)  # (points, columns); any number of points works
        w = tuple(widths)
        self.stem, self.stem_bn = SparseConv3d(in_features + 3, w[0], 3), SparseBatchNorm(w[0])
        self.enc = nn.ModuleList(BasicBlock(c, c) for c in w)
        self.down = nn.ModuleList(SparseConv3d(a, b, 2, stride=2) for a, b in zip(w, w[1:]))
        self.down_bn = nn.ModuleList(SparseBatchNorm(b) for b in w[1:])
        self.up = nn.ModuleList(SparseConvTranspose3d(b, a, 2) for a, b in zip(w, w[1:]))
        self.up_bn = nn.ModuleList(SparseBatchNorm(a) for a in w[:-1])
        self.dec = nn.ModuleList(BasicBlock(2 * a, a) for a in w[:-1])
        self.head = nn.Linear(w[0], num_classes)
        self.occupancy = nn.ModuleList(OccupancyGate(2**s) for s in range(len(w)))
        self._set_costs()

    def _set_costs(self) -> None:
        """Per level: FLOPs per 3x3x3 kernel-map pair and per voxel, from the layer shapes."""
        def macs(*layers) -> float:  # 2 C_in C_out per voxel or pair; conv weights are (k^3, C_in, C_out)
            return 2.0 * sum(m.in_features * m.out_features if isinstance(m, nn.Linear)
                             else m.weight.shape[1] * m.weight.shape[2] for m in layers)

        last = len(self.occupancy) - 1
        for s, gate in enumerate(self.occupancy):
            pair = [self.enc[s].conv1, self.enc[s].conv2] + ([self.stem] if s == 0 else [])
            voxel = [self.head] if s == 0 else []
            if s < last:
                pair += [self.dec[s].conv1, self.dec[s].conv2]
                voxel += [self.dec[s].proj, self.down[s], self.up[s]]
            gate.pair_flops, gate.voxel_flops = macs(*pair), macs(*voxel)

    # ---- forward --------------------------------------------------------------------------

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        pts = self._points(points)
        gate = self.occupancy[0]
        soft = gate.force is None and gate.mode in ("lgm", "lgm_st")
        everywhere = soft or gate.force is not None  # the network runs on every candidate voxel
        traced = tracing()
        pairs = self._pairs(pts, neighbours=everywhere or traced)
        r = relation(pairs.d, self.relation, gate.lam) if soft else None
        levels = self._levels(pairs, r)
        self._compute_sets(levels, everywhere, traced)
        masks = []
        for level, g in zip(levels, self.occupancy):
            decision = g.decide(level.occupied)
            mask = g(level.logit, decision, level.soft, level.units.coords[:, 0], points.shape[0],
                     self._pairs_per_unit(level, decision) if traced else None)
            masks.append(mask if everywhere else None)
        feats = self._voxel_features(pts, pairs, r, levels[0], masks[0])
        voxel_logits = self._network(SparseTensor(feats, levels[0].compute), masks)
        point_logits = self._devoxelise(voxel_logits, pairs, r, levels[0])
        out = points.new_zeros(points.shape[0], points.shape[1], self.num_classes)
        return out.index_put((pts.batch, pts.row), point_logits).permute(0, 2, 1)

    def _points(self, x: torch.Tensor) -> _Points:
        if x.dim() != 3 or x.shape[2] != self.input_shape[1]:
            raise DynattackError(f"{type(self).__name__} takes points (B, N, {self.input_shape[1]}) = xyz, "
                                 f"{self.input_shape[1] - 4} features, real-point flag; got {tuple(x.shape)}")
        batch, row = (x[..., -1] > 0.5).nonzero(as_tuple=True)
        xyz = x[batch, row, :3]
        # float64 floor, as data.points.voxelize: the voxel must not depend on float32 rounding
        cell = torch.floor(xyz.detach().double() / self.voxel_size).long()
        return _Points(batch, row, xyz / self.voxel_size, cell, x[batch, row, 3:-1])

    def _pairs(self, pts: _Points, neighbours: bool) -> _Pairs:
        """Each point with its own voxel, and (``neighbours``) with the 26 around it within reach."""
        dev = pts.cell.device
        offsets = kernel_offsets(3, dev) if neighbours else torch.zeros(1, 3, dtype=torch.long, device=dev)
        point = torch.arange(len(pts.cell), device=dev).repeat_interleave(len(offsets))
        offset = offsets.repeat(len(pts.cell), 1)
        if neighbours and self.reach < self.voxel_size:
            inside = (pts.u.detach() - pts.cell)[point]  # position in the own voxel, [0, 1)
            gap = torch.where(offset > 0, 1 - inside, torch.where(offset < 0, inside, torch.zeros_like(inside)))
            keep = gap.amax(1) * self.voxel_size <= self.reach
            point, offset = point[keep], offset[keep]
        cell = pts.cell[point] + offset
        coords = torch.cat([pts.batch[point, None], cell], 1)
        K.check_coords(coords)
        keys, voxel = torch.unique(K.pack(coords), return_inverse=True)
        d = pts.u[point] - (cell.to(pts.u.dtype) + 0.5)
        return _Pairs(point, voxel, d, (offset == 0).all(1), CoordinateSet(K.unpack(keys)))

    def _levels(self, pairs: _Pairs, r: torch.Tensor | None) -> list[_Level]:
        """Units, hard occupancy, logit and soft occupancy of every level."""
        units, n = pairs.units, len(pairs.units)
        margin = 0.5 - pairs.d.abs().amax(1)
        logit = margin.new_full((n,), float("-inf")).scatter_reduce(0, pairs.voxel, margin, "amax")
        occupied = torch.zeros(n, dtype=torch.bool, device=margin.device)
        occupied[pairs.voxel[pairs.own]] = True
        soft = None if r is None else 1 - r.new_ones(n).scatter_reduce(0, pairs.voxel, 1 - r, "prod")
        levels = [_Level(units, occupied, logit, soft)]
        for _ in range(1, len(self.occupancy)):
            fine = levels[-1]
            parent, coarse = fine.units.parent_index(2), fine.units.downsample(2)
            occupied = torch.zeros(len(coarse), dtype=torch.bool, device=parent.device)
            occupied[parent[fine.occupied]] = True
            logit = fine.logit.new_full((len(coarse),), float("-inf")).scatter_reduce(0, parent, fine.logit, "amax")
            soft = None if fine.soft is None else downsample_occupancy(fine.soft, fine.units)
            levels.append(_Level(coarse, occupied, logit, soft))
        return levels

    @staticmethod
    def _compute_sets(levels: list[_Level], everywhere: bool, traced: bool) -> None:
        """The voxels the network runs on: every candidate, or (hard network) the occupied ones.
        Coarser sets come from ``downsample``, the very objects the strided convolutions produce."""
        for s, level in enumerate(levels):
            if everywhere or not traced:  # without a trace the hard network's units are its voxels
                level.compute = level.units
            else:
                level.rows = level.occupied.nonzero().squeeze(1)
                level.compute = (CoordinateSet(level.units.coords[level.rows]) if s == 0
                                 else levels[s - 1].compute.downsample(2))

    @staticmethod
    def _pairs_per_unit(level: _Level, decision: torch.Tensor) -> torch.Tensor:
        """``(n,)`` float64: pairs of the level's 3x3x3 kernel map between units that both run."""
        on = decision if level.rows is None else decision[level.rows]
        kmap = level.compute.kernel_map(level.compute, 3)  # cached: the convolutions reuse it
        keep = on[kmap.in_idx] & on[kmap.out_idx]
        counts = torch.bincount(kmap.out_idx[keep], minlength=len(level.compute)).double()
        if level.rows is None:
            return counts
        return counts.new_zeros(len(level.units)).index_copy(0, level.rows, counts)

    def _voxel_features(self, pts: _Points, pairs: _Pairs, r: torch.Tensor | None, level: _Level,
                        mask: torch.Tensor | None) -> torch.Tensor:
        """Features of the level-0 compute voxels: mean of [point features, d] (hard), or the
        occupancy times the r-weighted mean (soft modes)."""
        n = len(level.units)
        own = pairs.voxel[pairs.own]  # one per point, in point order
        f_own = torch.cat([pts.feats, pairs.d[pairs.own]], 1)
        count = torch.bincount(own, minlength=n).clamp_min(1).to(f_own.dtype)
        hard = f_own.new_zeros(n, f_own.shape[1]).index_add(0, own, f_own) / count[:, None]
        if r is None:
            feats = hard if level.rows is None else hard[level.rows]
            return feats if mask is None else feats * mask[:, None]  # forced: every candidate, 1 or 0
        f = torch.cat([pts.feats[pairs.point], pairs.d], 1)
        den = r.new_zeros(n).index_add(0, pairs.voxel, r)
        soft = f.new_zeros(n, f.shape[1]).index_add(0, pairs.voxel, r[:, None] * f)
        soft = soft / torch.where(den > 0, den, torch.ones_like(den))[:, None]  # bilinear r can be 0
        mean = soft if self.occupancy[0].mode == "lgm" else _st(hard, soft)
        return mask[:, None] * mean

    def _devoxelise(self, voxel_logits: torch.Tensor, pairs: _Pairs, r: torch.Tensor | None,
                    level: _Level) -> torch.Tensor:
        """``(P, classes)``: each point's own voxel's logits, or (soft modes) its candidates'
        logits weighted by r normalised over the point's candidates."""
        own = pairs.voxel[pairs.own]  # one per point, in point order
        if r is None:
            if level.rows is not None:  # compute rows are the occupied units, in order
                own = (torch.cumsum(level.occupied, 0) - 1)[own]
            return voxel_logits[own]
        total = r.new_zeros(len(own)).index_add(0, pairs.point, r)  # > 0: the own pair's r is
        weight = r / total[pairs.point]
        if self.occupancy[0].mode == "lgm_st":
            weight = _st(pairs.own.to(r.dtype), weight)
        return voxel_logits.new_zeros(len(own), voxel_logits.shape[1]).index_add(
            0, pairs.point, weight[:, None] * voxel_logits[pairs.voxel])

    def _network(self, x: SparseTensor, masks: list[torch.Tensor | None]) -> torch.Tensor:
        """The U-Net on level-0 voxel features; ``(n, classes)`` voxel logits."""
        x = _relu(_scale(self.stem_bn(_scale(self.stem(x), masks[0])), masks[0]))
        skips = []
        for s, m in enumerate(masks):
            if s:
                x = _relu(_scale(self.down_bn[s - 1](_scale(self.down[s - 1](x), m)), m))
            x = self.enc[s](x, m)
            skips.append(x)
        for s in reversed(range(len(masks) - 1)):
            m = masks[s]
            x = _relu(_scale(self.up_bn[s](_scale(self.up[s](x, skips[s].coordinate_set), m)), m))
            x = self.dec[s](cat(x, skips[s]), m)
        logits = self.head(x.F)
        return logits if masks[0] is None else logits * masks[0][:, None]

    # ---- cost -----------------------------------------------------------------------------

    def executed_flops(self, trace: Trace) -> torch.Tensor:
        """``(B,)`` float64 FLOPs the hard network ran on each scene: per level, occupied voxels x
        ``voxel_flops`` + kernel-map pairs among them x ``pair_flops``."""
        total = None
        for event in trace:
            if not isinstance(event, VoxelEvent):
                raise ValueError(f"gate event {event.name} is not a voxel occupancy event")
            part = (event.decision.double() * event.voxel_flops + event.pairs * event.pair_flops).sum(1)
            total = part if total is None else total + part
        if total is None:
            raise ValueError("the trace holds no gate event: run the forward inside `with Trace()`")
        return total
