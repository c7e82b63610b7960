"""Point-cloud data: readers on tiny files written here, the synthetic rooms, voxelisation."""
import struct

import numpy as np
import pytest
import torch

from dynattack.data.points import (
    IGNORE_LABEL,
    S3DIS_CLASSES,
    SCANNET20_CLASSES,
    SEMANTICKITTI_CLASSES,
    SYNTHETIC_CLASSES,
    generate_scene,
    load_s3dis_room,
    load_scannet_scene,
    load_semantickitti_scan,
    read_ply,
    s3dis_rooms,
    synthetic_scenes,
    voxelize,
)
from dynattack.errors import DynattackError

XYZ = [(0.5, -1.25, 2.0), (3.0, 0.0, -0.5), (-2.5, 4.0, 1.0)]
RGB = [(255, 0, 128), (10, 20, 30), (0, 255, 255)]
NYU40 = [5, 13, 39]  # chair, (not a benchmark class), otherfurniture


def ply_header(fmt, n, props, faces=0):
    lines = ["ply", f"format {fmt} 1.0", "comment written by the test", f"element vertex {n}"]
    lines += [f"property {t} {name}" for t, name in props]
    if faces:
        lines += [f"element face {faces}", "property list uchar int vertex_indices"]
    return ("\n".join(lines + ["end_header"]) + "\n").encode()


def write_binary_ply(path, rows, props, order="<", faces=True):
    """Vertices plus one triangle, like a ScanNet mesh."""
    codes = {"float": "f", "uchar": "B", "ushort": "H", "int": "i"}
    fmt = order + "".join(codes[t] for t, _ in props)
    body = b"".join(struct.pack(fmt, *row) for row in rows)
    if faces:
        body += struct.pack(order + "B3i", 3, 0, 1, 2)
    name = "binary_little_endian" if order == "<" else "binary_big_endian"
    path.write_bytes(ply_header(name, len(rows), props, faces=int(faces)) + body)


MESH_PROPS = [("float", "x"), ("float", "y"), ("float", "z"), ("uchar", "red"), ("uchar", "green"),
              ("uchar", "blue"), ("uchar", "alpha")]


def check_scene(cloud, labels):
    torch.testing.assert_close(cloud.coords, torch.tensor(XYZ, dtype=torch.float32))
    torch.testing.assert_close(cloud.feats, torch.tensor(RGB, dtype=torch.float32) / 255)
    assert cloud.labels.tolist() == labels
    assert cloud.coords.dtype == torch.float32 and cloud.labels.dtype == torch.int64


def test_scannet_binary_ply_with_v2_labels_file(tmp_path):
    mesh = tmp_path / "scene0000_00_vh_clean_2.ply"
    write_binary_ply(mesh, [(*p, *c, 255) for p, c in zip(XYZ, RGB)], MESH_PROPS)
    labelled = tmp_path / "scene0000_00_vh_clean_2.labels.ply"
    write_binary_ply(labelled, [(*p, *c, 255, lab) for p, c, lab in zip(XYZ, RGB, NYU40)], MESH_PROPS + [("ushort", "label")])
    cloud = load_scannet_scene(mesh)  # finds the sibling labels file
    check_scene(cloud, [SCANNET20_CLASSES.index("chair"), IGNORE_LABEL, SCANNET20_CLASSES.index("otherfurniture")])
    assert cloud.class_names == SCANNET20_CLASSES
    assert load_scannet_scene(mesh, raw_labels=True).labels.tolist() == NYU40


def test_scannet_ascii_ply_with_label_property_and_explicit_file(tmp_path):
    mesh = tmp_path / "room.ply"
    rows = [" ".join(map(str, (*p, *c, lab))) for p, c, lab in zip(XYZ, RGB, NYU40)]
    props = MESH_PROPS[:6] + [("int", "label")]
    mesh.write_bytes(ply_header("ascii", 3, props, faces=1) + ("\n".join(rows) + "\n3 0 1 2\n").encode())
    check_scene(load_scannet_scene(mesh), [4, IGNORE_LABEL, 19])
    other = tmp_path / "other.labels.ply"
    write_binary_ply(other, [(*p, 2) for p in XYZ], MESH_PROPS[:3] + [("ushort", "label")], order=">", faces=False)
    check_scene(load_scannet_scene(mesh, labels_path=other), [SCANNET20_CLASSES.index("floor")] * 3)


def test_ply_without_labels_and_bad_files(tmp_path):
    mesh = tmp_path / "scan.ply"
    write_binary_ply(mesh, [(*p, *c, 255) for p, c in zip(XYZ, RGB)], MESH_PROPS)
    check_scene(load_scannet_scene(mesh), [IGNORE_LABEL] * 3)
    assert set(read_ply(mesh)) == {"x", "y", "z", "red", "green", "blue", "alpha"}
    truncated = tmp_path / "truncated.ply"
    truncated.write_bytes(mesh.read_bytes()[:-40])
    with pytest.raises(DynattackError, match="truncated"):
        read_ply(truncated)
    with pytest.raises(DynattackError, match="not a PLY"):
        (tmp_path / "junk.ply").write_bytes(b"hello")
        read_ply(tmp_path / "junk.ply")
    with pytest.raises(DynattackError, match="cannot read"):
        read_ply(tmp_path / "missing.ply")
    bare = tmp_path / "bare.ply"
    write_binary_ply(bare, XYZ, MESH_PROPS[:3], faces=False)
    with pytest.raises(DynattackError, match="lack red, green, blue"):
        load_scannet_scene(bare)


def write_s3dis_room(root, area, room, objects):
    ann = root / f"Area_{area}" / room / "Annotations"
    ann.mkdir(parents=True)
    for name, rows in objects.items():
        (ann / f"{name}.txt").write_text("".join(" ".join(map(str, r)) + "\n" for r in rows))
    return ann.parent


def test_s3dis_room_tree(tmp_path):
    room = write_s3dis_room(tmp_path, 1, "office_1", {
        "chair_1": [(0.1, 0.2, 0.3, 255, 0, 0), (0.4, 0.5, 0.6, 0, 255, 0)],
        "table_2": [(1.0, 1.0, 0.7, 10, 20, 30)],
        "stairs_1": [(2.0, 0.0, 0.1, 0, 0, 0)],
    })
    write_s3dis_room(tmp_path, 5, "hallway_6", {"ceiling_1": [(0, 0, 3, 1, 2, 3)]})
    cloud = load_s3dis_room(room)
    # Files are read in name order: chair_1, stairs_1, table_2.
    assert [cloud.class_names[i] for i in cloud.labels] == ["chair", "chair", "clutter", "table"]
    torch.testing.assert_close(cloud.coords[0], torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(cloud.feats[3], torch.tensor([10, 20, 30]) / 255.0)
    assert cloud.class_names == S3DIS_CLASSES
    assert [p.name for p in s3dis_rooms(tmp_path)] == ["office_1", "hallway_6"]
    assert [p.name for p in s3dis_rooms(tmp_path, areas=(5,))] == ["hallway_6"]


def test_s3dis_stray_byte_unknown_class_and_missing(tmp_path):
    room = write_s3dis_room(tmp_path, 2, "wc_1", {"wall_1": [(1, 2, 3, 4, 5, 6)]})
    (room / "Annotations" / "wall_1.txt").write_text("1 2 3 4 5 6\n7 8 9\x10 10 11 12\n")
    assert load_s3dis_room(room).coords.tolist() == [[1, 2, 3], [7, 8, 9]]
    (room / "Annotations" / "robot_1.txt").write_text("0 0 0 0 0 0\n")
    with pytest.raises(DynattackError, match="unknown S3DIS class 'robot'"):
        load_s3dis_room(room)
    with pytest.raises(DynattackError, match="no S3DIS annotation files"):
        load_s3dis_room(tmp_path / "nowhere")


def test_semantickitti_bin_and_label(tmp_path):
    seq = tmp_path / "sequences" / "08"
    (seq / "velodyne").mkdir(parents=True)
    (seq / "labels").mkdir()
    scan = np.array([[1, 2, 3, 0.5], [-4, 5, -6, 0.25], [7, 8, 9, 1.0], [0, 0, 0, 0]], dtype=np.float32)
    scan.tofile(seq / "velodyne" / "000000.bin")
    semantic = np.array([10, 252, 40, 52], dtype=np.uint32)  # car, moving-car, road, other-structure
    instance = np.array([3, 7, 0, 0], dtype=np.uint32)
    (semantic | (instance << 16)).astype("<u4").tofile(seq / "labels" / "000000.label")
    cloud = load_semantickitti_scan(seq / "velodyne" / "000000.bin")
    torch.testing.assert_close(cloud.coords, torch.from_numpy(scan[:, :3]))
    torch.testing.assert_close(cloud.feats, torch.from_numpy(scan[:, 3:]))
    car, road = SEMANTICKITTI_CLASSES.index("car"), SEMANTICKITTI_CLASSES.index("road")
    assert cloud.labels.tolist() == [car, car, road, IGNORE_LABEL]
    assert load_semantickitti_scan(seq / "velodyne" / "000000.bin", raw_labels=True).labels.tolist() == [10, 252, 40, 52]
    np.zeros(3, dtype="<u4").tofile(tmp_path / "short.label")
    with pytest.raises(DynattackError, match="3 labels for 4 points"):
        load_semantickitti_scan(seq / "velodyne" / "000000.bin", tmp_path / "short.label")
    (tmp_path / "odd.bin").write_bytes(b"\0" * 20)
    with pytest.raises(DynattackError, match="multiple of 16 bytes"):
        load_semantickitti_scan(tmp_path / "odd.bin")


def test_synthetic_scenes_deterministic_and_cover_all_classes():
    a = synthetic_scenes("val", 4, seed=0, density=500.0)  # sparse: fast, same rooms
    b = synthetic_scenes("val", 2, seed=0, density=500.0)  # scene i depends on (split, seed, i) only
    for x, y in zip(a, b):
        assert torch.equal(x.coords, y.coords) and torch.equal(x.feats, y.feats) and torch.equal(x.labels, y.labels)
    assert not torch.equal(synthetic_scenes("train", 1, density=500.0)[0].coords[:100], a[0].coords[:100])
    seen = set()
    for s in a:
        n = len(s.coords)
        assert 5_000 < n < 100_000
        assert s.coords.shape == (n, 3) and s.feats.shape == (n, 3) and s.labels.shape == (n,)
        assert s.coords.dtype == torch.float32 and s.feats.dtype == torch.float32 and s.labels.dtype == torch.int64
        assert 0 <= float(s.feats.min()) and float(s.feats.max()) <= 1
        floor = s.coords[s.labels == SYNTHETIC_CLASSES.index("floor")]
        assert float(floor[:, 2].abs().max()) < 0.05  # floor at z = 0 plus noise
        seen |= set(s.labels.tolist())
        assert s.class_names == SYNTHETIC_CLASSES
    assert seen == set(range(len(SYNTHETIC_CLASSES)))
    with pytest.raises(DynattackError, match="unknown split"):
        synthetic_scenes("holdout", 1)


def test_scanner_density_falls_with_distance():
    far = generate_scene(3, density=500.0, scanner_ref=1.0)
    near = generate_scene(3, density=500.0, scanner_ref=100.0)  # no thinning at all
    assert len(far.coords) < 0.6 * len(near.coords)


def test_voxelize_hand_example():
    pts = torch.tensor([[0.01, 0.01, 0.01], [0.015, 0.0, 0.019], [-0.001, 0.0, 0.0], [0.05, 0.025, 0.039]])
    feats = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [7.0, 1.0]])
    v = voxelize(pts, 0.02, feats)
    assert v.coords.tolist() == [[-1, 0, 0], [0, 0, 0], [2, 1, 1]]
    assert v.inverse.tolist() == [1, 1, 0, 2]
    assert v.feats.tolist() == [[5.0, 5.0], [2.0, 1.0], [7.0, 1.0]]
    assert voxelize(pts, 0.02).feats is None
    with pytest.raises(DynattackError, match="positive"):
        voxelize(pts, 0.0)
