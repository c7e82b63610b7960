"""Sparse convolution against dense conv3d / conv_transpose3d, kernel maps against brute force."""

import pytest
import torch
import torch.nn.functional as F

from dynattack.errors import DynattackError
from dynattack.sparse import (
    COORD_MAX,
    COORD_MIN,
    MAX_BATCH,
    CoordinateSet,
    SparseBatchNorm,
    SparseConv3d,
    SparseConvTranspose3d,
    SparseReLU,
    SparseTensor,
    conv3d,
    conv_transpose3d,
    downsample_occupancy,
    global_pool,
    kernel_offsets,
)
from dynattack.sparse import keys

DT = torch.float64
G = 8  # dense grid side (a multiple of 4, so two stride-2 levels line up)
ORIGIN = torch.tensor([-8, 4, -12])  # multiples of 4, negative coordinates included


def random_sites(batch=2, density=0.3, seed=0):
    """Unique random grid cells (batch, i, j, k) in [0, G)^3 per batch item."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, G, G, G, generator=g) < density
    return mask.nonzero()


def to_coords(sites, scale=1):
    c = sites.clone()
    c[:, 1:] = c[:, 1:] * scale + ORIGIN
    return c


def dense_from(feats, sites, batch, side=G):
    dense = torch.zeros(batch, feats.shape[1], side, side, side, dtype=DT)
    dense[sites[:, 0], :, sites[:, 1], sites[:, 2], sites[:, 3]] = feats.detach()
    return dense.requires_grad_()


def read(dense, sites):
    return dense[sites[:, 0], :, sites[:, 1], sites[:, 2], sites[:, 3]]


def at(dense_grad, sites):
    return dense_grad[sites[:, 0], :, sites[:, 1], sites[:, 2], sites[:, 3]]


def conv_weight(w, k):
    """Our (k**3, Ci, Co) weight as a dense conv3d weight (Co, Ci, k, k, k)."""
    return w.reshape(k, k, k, w.shape[1], w.shape[2]).permute(4, 3, 0, 1, 2)


def leaf(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT).requires_grad_()


def backward_both(sparse_out, dense_out_at_sites, seed=99):
    r = torch.randn(sparse_out.shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
    (sparse_out * r).sum().backward()
    (dense_out_at_sites * r).sum().backward()


@pytest.mark.parametrize("k,dilation", [(3, 1), (3, 2), (1, 1), (5, 1)])
def test_submanifold_equals_dense_conv3d_masked(k, dilation):
    sites = random_sites()
    feats, w = leaf(len(sites), 3, seed=1), leaf(k**3, 3, 4, seed=2)
    out = conv3d(SparseTensor(feats, to_coords(sites)), w, dilation=dilation)

    dense_in = dense_from(feats, sites, 2)
    wd = conv_weight(w.detach(), k).clone().requires_grad_()
    dense_out = F.conv3d(dense_in, wd, padding=dilation * (k - 1) // 2, dilation=dilation)
    torch.testing.assert_close(out.F, read(dense_out, sites))
    assert torch.equal(out.C, to_coords(sites))

    backward_both(out.F, read(dense_out, sites))
    torch.testing.assert_close(feats.grad, at(dense_in.grad, sites))
    torch.testing.assert_close(conv_weight(w.grad, k), wd.grad)


@pytest.mark.parametrize("k", [2, 3])
def test_strided_equals_dense_conv3d_stride2(k):
    sites = random_sites(seed=3)
    feats, w = leaf(len(sites), 3, seed=4), leaf(k**3, 3, 5, seed=5)
    x = SparseTensor(feats, to_coords(sites))
    bias = leaf(5, seed=6)
    out = conv3d(x, w, bias, stride=2)
    assert out.stride == 2

    # Output voxels: unique(floor(c / 2) * 2), checked by hand.
    c = to_coords(sites)
    expect = {(b, *(2 * (v // 2) for v in xyz)) for b, *xyz in c.tolist()}
    assert {tuple(r) for r in out.C.tolist()} == expect

    coarse_sites = out.C.clone()
    coarse_sites[:, 1:] = (coarse_sites[:, 1:] - ORIGIN) // 2
    dense_in = dense_from(feats, sites, 2)
    wd = conv_weight(w.detach(), k).clone().requires_grad_()
    bd = bias.detach().clone().requires_grad_()
    dense_out = F.conv3d(dense_in, wd, bd, stride=2, padding=(k - 1) // 2)
    torch.testing.assert_close(out.F, read(dense_out, coarse_sites))

    backward_both(out.F, read(dense_out, coarse_sites))
    torch.testing.assert_close(feats.grad, at(dense_in.grad, sites))
    torch.testing.assert_close(conv_weight(w.grad, k), wd.grad)
    torch.testing.assert_close(bias.grad, bd.grad)


@pytest.mark.parametrize("k", [2, 3])
def test_transposed_equals_dense_conv_transpose3d(k):
    sites = random_sites(seed=7)
    fine = CoordinateSet(to_coords(sites))
    coarse = fine.downsample(2)
    coarse_sites = coarse.coords.clone()
    coarse_sites[:, 1:] = (coarse_sites[:, 1:] - ORIGIN) // 2
    feats, w = leaf(len(coarse), 4, seed=8), leaf(k**3, 4, 3, seed=9)
    out = conv_transpose3d(SparseTensor(feats, coarse), w, fine)
    assert out.coordinate_set is fine

    dense_in = dense_from(feats, coarse_sites, 2, side=G // 2)
    wt = w.detach().reshape(k, k, k, 4, 3).permute(3, 4, 0, 1, 2).clone().requires_grad_()
    pad = (k - 1) // 2
    dense_out = F.conv_transpose3d(dense_in, wt, stride=2, padding=pad, output_padding=G - ((G // 2 - 1) * 2 - 2 * pad + k))
    assert dense_out.shape[-1] == G
    torch.testing.assert_close(out.F, read(dense_out, sites))

    backward_both(out.F, read(dense_out, sites))
    torch.testing.assert_close(feats.grad, at(dense_in.grad, coarse_sites))
    torch.testing.assert_close(w.grad.reshape(k, k, k, 4, 3).permute(3, 4, 0, 1, 2), wt.grad)


def test_unet_chain_two_levels_equals_dense():
    """Down, down, up, up (kernel 2, stride 2), each level masked to its voxels, vs dense."""
    sites = random_sites(density=0.4, seed=11)
    feats = leaf(len(sites), 2, seed=12)
    w = [leaf(8, 2, 2, seed=13 + i) for i in range(4)]
    x0 = SparseTensor(feats, to_coords(sites))
    x1 = conv3d(x0, w[0], stride=2)
    x2 = conv3d(x1, w[1], stride=2)
    assert x2.stride == 4
    u1 = conv_transpose3d(x2, w[2], x1.coordinate_set)
    u0 = conv_transpose3d(u1, w[3], x0.coordinate_set)

    def mask_of(cs, scale):
        m = torch.zeros(2, 1, G // scale, G // scale, G // scale, dtype=DT)
        idx = (cs.coords[:, 1:] - ORIGIN) // scale
        m[cs.coords[:, 0], 0, idx[:, 0], idx[:, 1], idx[:, 2]] = 1
        return m

    d0 = dense_from(feats, sites, 2)
    wd = [conv_weight(v.detach(), 2).clone().requires_grad_() for v in w[:2]]
    wt = [v.detach().reshape(2, 2, 2, 2, 2).permute(3, 4, 0, 1, 2).clone().requires_grad_() for v in w[2:]]
    d1 = F.conv3d(d0, wd[0], stride=2)  # zero wherever no child voxel: no mask needed
    d2 = F.conv3d(d1, wd[1], stride=2)
    e1 = F.conv_transpose3d(d2, wt[0], stride=2) * mask_of(x1.coordinate_set, 2)
    e0 = F.conv_transpose3d(e1, wt[1], stride=2)
    torch.testing.assert_close(u0.F, read(e0, sites))
    backward_both(u0.F, read(e0, sites))
    torch.testing.assert_close(feats.grad, at(d0.grad, sites))
    torch.testing.assert_close(conv_weight(w[0].grad, 2), wd[0].grad)
    torch.testing.assert_close(w[3].grad.reshape(2, 2, 2, 2, 2).permute(3, 4, 0, 1, 2), wt[1].grad)


def test_autograd_gradcheck_submanifold():
    sites = random_sites(batch=1, density=0.05, seed=21)
    feats, w = leaf(len(sites), 2, seed=22), leaf(27, 2, 2, seed=23)
    cs = CoordinateSet(to_coords(sites))
    assert torch.autograd.gradcheck(lambda f, w: conv3d(SparseTensor(f, cs), w).F, (feats, w))


# ---- kernel maps at the edges of the key range ----

def extreme_coords(margin=0):
    """Clusters ``margin`` voxels from the lowest and highest supported coordinates, around zero,
    in the first and last batch items. Margin 0 touches the limits (neighbour queries leave the
    range); margin 8 stays clear of them (the fast key-arithmetic path)."""
    g = torch.Generator().manual_seed(5)
    lo, hi = COORD_MIN + margin, COORD_MAX - 3 - margin
    corners = [(0, lo, lo, lo), (MAX_BATCH, hi, hi, hi), (1, -2, -2, -2), (0, lo, 0, hi)]
    rows = []
    for b, *lo in corners:
        cells = (torch.rand(4, 4, 4, generator=g) < 0.5).nonzero()
        rows.append(torch.cat([torch.full((len(cells), 1), b), cells + torch.tensor(lo)], 1))
    return torch.cat(rows)


def brute_force_pairs(src, dst, offsets):
    index = {tuple(c): i for i, c in enumerate(src.tolist())}
    pairs = set()
    for o, (b, *xyz) in enumerate(dst.tolist()):
        for j, u in enumerate(offsets.tolist()):
            i = index.get((b, *(a + d for a, d in zip(xyz, u))))
            if i is not None:
                pairs.add((j, i, o))
    return pairs


def map_pairs(kmap):
    return {(j, i, o) for j in range(len(kmap.counts)) for i, o in zip(*(t.tolist() for t in kmap.pairs(j)))}


def test_key_packing_roundtrip_and_order_at_extremes():
    c = extreme_coords()
    k = keys.pack(c)
    assert torch.equal(keys.unpack(k), c)
    order = sorted(range(len(c)), key=lambda i: tuple(c[i].tolist()))
    assert torch.equal(torch.argsort(k), torch.tensor(order))


@pytest.mark.parametrize("margin", [0, 8])
def test_submanifold_map_at_extremes_matches_brute_force(margin):
    c = extreme_coords(margin)
    cs = CoordinateSet(c)
    assert cs._offsets_stay_in_range(kernel_offsets(3) * 2) == bool(margin)  # both search paths covered
    for k, dil in [(3, 1), (3, 2), (2, 1)]:
        offsets = kernel_offsets(k) * dil
        assert map_pairs(cs.kernel_map(cs, k, dil)) == brute_force_pairs(c, c, offsets)


@pytest.mark.parametrize("margin", [0, 8])
def test_strided_and_transposed_maps_at_extremes_match_brute_force(margin):
    c = extreme_coords(margin)
    fine = CoordinateSet(c)
    coarse = fine.downsample(2)
    expect = {(b, *(2 * (v // 2) for v in xyz)) for b, *xyz in c.tolist()}
    assert {tuple(r) for r in coarse.coords.tolist()} == expect
    assert torch.equal(coarse.coords[fine.parent_index(2)][:, 1:], torch.div(c[:, 1:], 2, rounding_mode="floor") * 2)
    for k in (2, 3):
        offsets = kernel_offsets(k)
        assert map_pairs(coarse.kernel_map(fine, k)) == brute_force_pairs(c, coarse.coords, offsets)
        up = map_pairs(fine.kernel_map(coarse, k, transposed=True))
        assert up == brute_force_pairs(coarse.coords, c, -offsets)
    # A second level (stride 2 -> 4) still uses finest-voxel units.
    coarser = coarse.downsample(2)
    assert coarser.stride == 4 and bool((coarser.coords[:, 1:] % 4 == 0).all())
    assert map_pairs(coarser.kernel_map(coarse, 2)) == brute_force_pairs(coarse.coords, coarser.coords, kernel_offsets(2) * 2)


@pytest.mark.parametrize("bad", [
    [[0, COORD_MAX + 1, 0, 0]], [[0, 0, COORD_MIN - 1, 0]], [[MAX_BATCH + 1, 0, 0, 0]], [[-1, 0, 0, 0]],
])
def test_out_of_range_coordinates_raise(bad):
    with pytest.raises(DynattackError, match="supported range"):
        CoordinateSet(torch.tensor(bad))


def test_bad_coordinate_sets_raise():
    with pytest.raises(DynattackError, match="unique"):
        CoordinateSet(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]))
    with pytest.raises(DynattackError, match="integers"):
        CoordinateSet(torch.zeros(2, 4))
    with pytest.raises(DynattackError, match="multiples"):
        CoordinateSet(torch.tensor([[0, 1, 2, 4]]), stride=2)


def test_lookup_outside_range_is_absent_not_aliased():
    cs = CoordinateSet(torch.tensor([[0, COORD_MIN, 0, 0], [0, COORD_MAX, 0, 0]]))
    q = torch.tensor([[0, COORD_MAX + 1, 0, 0], [0, COORD_MIN - 1, 0, 0], [0, COORD_MAX, 0, 0]])
    assert cs.lookup(q).tolist() == [-1, -1, 1]


# ---- caching, layers, helpers ----

def test_kernel_map_built_once_per_coordinate_set():
    sites = random_sites(seed=31)
    x = SparseTensor(torch.randn(len(sites), 4, dtype=DT), to_coords(sites))
    a, b = SparseConv3d(4, 4).double(), SparseConv3d(4, 4).double()
    y = b(a(x))
    assert y.coordinate_set is x.coordinate_set
    assert x.coordinate_set.maps_built == 1
    a(y)
    assert x.coordinate_set.maps_built == 1  # cache hit: no new map
    down = SparseConv3d(4, 4, 2, stride=2).double()
    d1, d2 = down(x), down(y)
    assert d1.coordinate_set is d2.coordinate_set and d1.coordinate_set.maps_built == 1
    SparseConvTranspose3d(4, 4).double()(d1, x.coordinate_set)
    SparseConvTranspose3d(4, 4).double()(d2, x.coordinate_set)
    assert x.coordinate_set.maps_built == 2  # the submanifold map + one upsampling map


def test_modules_bias_batchnorm_relu():
    sites = random_sites(seed=41)
    feats = torch.randn(len(sites), 3, dtype=DT)
    x = SparseTensor(feats, to_coords(sites))
    conv = SparseConv3d(3, 4, bias=True).double()
    bn, relu = SparseBatchNorm(4).double(), SparseReLU()
    y = relu(bn(conv(x)))
    ref_bn = torch.nn.BatchNorm1d(4).double()
    raw = conv3d(x, conv.weight, conv.bias).F
    torch.testing.assert_close(y.F, torch.relu(ref_bn(raw)))
    assert y.coordinate_set is x.coordinate_set


def test_global_pool_per_batch_item():
    sites = random_sites(batch=3, seed=51)
    feats = torch.randn(len(sites), 5, dtype=DT)
    x = SparseTensor(feats, to_coords(sites))
    for mode, fn in [("mean", lambda t: t.mean(0)), ("max", lambda t: t.max(0).values)]:
        expect = torch.stack([fn(feats[sites[:, 0] == b]) for b in range(3)])
        torch.testing.assert_close(global_pool(x, mode), expect)


def test_downsample_occupancy_is_noisy_or_of_children():
    sites = random_sites(seed=61)
    cs = CoordinateSet(to_coords(sites))
    occ = torch.rand(len(cs), dtype=DT)
    got = downsample_occupancy(occ, cs)
    coarse = cs.downsample(2)
    for row, parent in enumerate(coarse.coords.tolist()):
        children = [i for i, c in enumerate(cs.coords.tolist())
                    if c[0] == parent[0] and all(2 * (v // 2) == p for v, p in zip(c[1:], parent[1:]))]
        expect = 1 - torch.prod(1 - occ[children])
        torch.testing.assert_close(got[row], expect)
    hard = downsample_occupancy(torch.ones(len(cs), dtype=DT), cs)
    assert torch.equal(hard, torch.ones(len(coarse), dtype=DT))


# ---- optional spconv backend ----

def _spconv_available():
    from dynattack.sparse import spconv_backend

    return spconv_backend.available()


@pytest.mark.skipif(not _spconv_available(), reason="spconv not installed")
@pytest.mark.parametrize("seed", [0, 1])
def test_spconv_backend_matches_ours_even_with_two_threads(seed):
    # 12^3 at half density: big enough that unforced two-thread spconv gets the feature gradient wrong.
    g = torch.Generator().manual_seed(seed)
    coords = (torch.rand(2, 12, 12, 12, generator=g) < 0.5).nonzero()
    coords[:, 1:] -= 6
    feats = torch.randn(len(coords), 8, generator=g).requires_grad_()
    w = (0.3 * torch.randn(27, 8, 6, generator=g)).requires_grad_()
    x = SparseTensor(feats, coords)
    ours = conv3d(x, w)
    r = torch.randn(ours.F.shape, generator=g)
    g_ours = torch.autograd.grad((ours.F * r).sum(), (feats, w))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # spconv alone is wrong with more than one thread; the backend forces one
    try:
        theirs = conv3d(x, w, backend="spconv")
        g_theirs = torch.autograd.grad((theirs.F * r).sum(), (feats, w))
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(theirs.F, ours.F, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_theirs, g_ours):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
