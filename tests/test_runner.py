"""The runner: resume after a kill or a full disk, shards merged, all equal to one uninterrupted run."""
import errno
import json
import shutil

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dynattack import rundir, runner
from dynattack.attacks import GradAuto
from dynattack.errors import DynattackError
from dynattack.runner import RunConfig
from toy_models import ToyGated

N, BS = 10, 3


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(N, 1, 4, 4, generator=g) * 0.6
    labels = torch.randint(0, 3, (N,), generator=g)
    return images, labels


def config(**kw):
    return RunConfig(**{"victim": "toy", "attack": "gradauto", "params": {"steps": 15}, "n": N, "batch_size": BS,
                        "seed": 3, **kw})


def make_attack(model):
    return GradAuto(model, steps=15, progress=False)


def run_full(tmp_path, data, name="full", **kw):
    model = ToyGated()
    cfg = config(**kw)
    runner.run_attack(model, make_attack(model), cfg, *data, tmp_path / name, progress=False)
    return model, tmp_path / name


def results(run_dir):
    records = runner.read_records(run_dir)
    shards = {p.name: load_file(str(p)) for p in sorted((run_dir / "adv").glob("*.safetensors"))}
    return records, shards


def assert_same_run(a, b):
    rec_a, sh_a = results(a)
    rec_b, sh_b = results(b)
    assert rec_a == rec_b
    assert sh_a.keys() == sh_b.keys()
    for name in sh_a:
        for key in sh_a[name]:
            assert torch.equal(sh_a[name][key], sh_b[name][key]), (name, key)


def summary_without_timing(model, run_dir, images):
    s = runner.finish_run(model, run_dir, images, latency_n=0, report=False)
    assert json.loads((run_dir / "summary.json").read_text()) == s
    return {k: v for k, v in s.items() if k not in runner.TIMING_KEYS}


class KilledAfter:
    """An attack that dies (like a SIGKILL) after ``n`` batches."""

    def __init__(self, attack, n):
        self.attack, self.n, self.calls = attack, n, 0

    def __getattr__(self, name):
        return getattr(self.attack, name)

    def __setattr__(self, name, value):
        if name in ("attack", "n", "calls"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.attack, name, value)

    def __call__(self, x, y):
        if self.calls == self.n:
            raise KeyboardInterrupt
        self.calls += 1
        return self.attack(x, y)


def test_resume_after_kill_equals_uninterrupted(tmp_path, data):
    model, full = run_full(tmp_path, data)
    want = summary_without_timing(model, full, data[0])
    assert want["n"] == N and want["recovery_pct"] is not None

    part = tmp_path / "killed"
    model = ToyGated()
    with pytest.raises(KeyboardInterrupt):
        runner.run_attack(model, KilledAfter(make_attack(model), 2), config(), *data, part, progress=False)
    assert len(runner.read_records(part)) == 2 * BS
    # a kill in the middle of the next append and of a shard write leaves debris behind
    with open(part / "samples.jsonl", "a") as f:
        f.write('{"index": 6, "batch": 2, "batch_si')
    (part / "adv" / ".batch_00002.safetensors.tmp").write_bytes(b"half")
    with pytest.raises(DynattackError, match="--resume"):
        runner.run_attack(model, make_attack(model), config(), *data, part, progress=False)
    runner.run_attack(model, make_attack(model), config(), *data, part, resume=True, progress=False)
    assert_same_run(full, part)
    assert summary_without_timing(model, part, data[0]) == want


def test_resume_refuses_another_config(tmp_path, data):
    model, full = run_full(tmp_path, data)
    with pytest.raises(DynattackError, match="another configuration"):
        runner.run_attack(model, make_attack(model), config(seed=4), *data, full, resume=True, progress=False)


DISK_FULL = [OSError(errno.ENOSPC, "No space left on device"),
             # safetensors raises its own error type, not an OSError
             SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")]


@pytest.mark.parametrize("error", DISK_FULL, ids=["OSError", "SafetensorError"])
def test_full_disk_keeps_finished_batches(tmp_path, data, monkeypatch, error):
    model, full = run_full(tmp_path, data)
    real_save = rundir.save_file

    def save_until_full(tensors, path):
        if "batch_00002" in path:
            raise error
        real_save(tensors, path)

    monkeypatch.setattr(rundir, "save_file", save_until_full)
    part = tmp_path / "full-disk"
    model = ToyGated()
    with pytest.raises(DynattackError, match="No space left on device") as exc:
        runner.run_attack(model, make_attack(model), config(), *data, part, progress=False)
    assert "\n" not in str(exc.value)
    assert len(runner.read_records(part)) == 2 * BS
    assert not list((part / "adv").glob(".*.tmp"))
    monkeypatch.setattr(rundir, "save_file", real_save)
    runner.run_attack(model, make_attack(model), config(), *data, part, resume=True, progress=False)
    assert_same_run(full, part)


def test_failed_append_is_cut_back(tmp_path, data, monkeypatch):
    model, full = run_full(tmp_path, data)
    before = (full / "samples.jsonl").read_bytes()
    real_open = open

    def open_that_fills(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        if "a" in mode:
            def write(text):
                f.buffer.write(text[:10].encode())  # part of the line reaches the disk, then it is full
                f.buffer.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f

    monkeypatch.setattr("builtins.open", open_that_fills)
    with pytest.raises(DynattackError, match="No space left on device"):
        rundir.append_lines(full / "samples.jsonl", [{"index": 99}])
    monkeypatch.undo()
    assert (full / "samples.jsonl").read_bytes() == before


class FakeClock:
    """perf_counter that advances one second per call: each batch is timed at exactly 1 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


def test_resume_sums_the_attack_time_of_every_process(tmp_path, data, monkeypatch):
    monkeypatch.setattr(runner, "time", FakeClock())
    part = tmp_path / "killed"
    model = ToyGated()
    with pytest.raises(KeyboardInterrupt):
        runner.run_attack(model, KilledAfter(make_attack(model), 2), config(), *data, part, progress=False)
    monkeypatch.setattr(runner, "time", FakeClock())  # a new process
    runner.run_attack(model, make_attack(model), config(), *data, part, resume=True, progress=False)
    s = runner.finish_run(model, part, data[0], latency_n=0, report=False)
    assert s["seconds"] == 4.0  # 2 batches in the killed process + 2 in the resumed one, 1 s each
    lines = [json.loads(line) for line in (part / "batches.jsonl").read_text().splitlines()]
    assert [b["batch"] for b in lines] == [0, 1, 2, 3]
    assert {b["threads"] for b in lines} == {torch.get_num_threads()}


def test_resume_redoes_a_shard_that_does_not_hold_its_rows(tmp_path, data):
    model, full = run_full(tmp_path, data)
    part = tmp_path / "damaged"
    shutil.copytree(full, part)
    one, two = part / "adv" / "batch_00001.safetensors", part / "adv" / "batch_00002.safetensors"
    one.write_bytes(one.read_bytes()[:-50])  # truncated by a full disk or a copy
    shutil.copyfile(part / "adv" / "batch_00000.safetensors", two)  # loads, but holds another batch's rows
    runner.run_attack(model, make_attack(model), config(), *data, part, resume=True, progress=False)
    assert_same_run(full, part)


def test_shards_merged_equal_one_run(tmp_path, data):
    model, full = run_full(tmp_path, data)
    for i in range(2):
        run_full(tmp_path, data, name=f"shard{i}", shard=(i, 2))
    assert {r["batch"] for r in runner.read_records(tmp_path / "shard1")} == {1, 3}
    merged = runner.merge_runs([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged")
    assert_same_run(full, merged)
    assert summary_without_timing(model, merged, data[0]) == summary_without_timing(model, full, data[0])
    with pytest.raises(DynattackError, match="shards"):
        runner.merge_runs([tmp_path / "shard0"], tmp_path / "bad")


def test_summary_figures_match_records(tmp_path, data):
    model, full = run_full(tmp_path, data)
    s = summary_without_timing(model, full, data[0])
    recs = runner.read_records(full)
    clean = sum(r["flops_clean"] for r in recs)
    adv = sum(r["flops_adv"] for r in recs)
    total = sum(r["flops_full"] for r in recs)
    assert s["recovery_pct"] == pytest.approx((adv - clean) / (total - clean) * 100)
    assert s["clean_acc"] == pytest.approx(sum(r["clean_pred"] == r["label"] for r in recs) / N)
    assert set(json.loads((full / "summary.json").read_text())) == set(runner.SUMMARY_KEYS)
    # the shards hold exactly the inputs the records describe
    _, adv_images = runner.load_adversarial(full)
    assert torch.allclose((adv_images - data[0]).abs().flatten(1).amax(1).double(),
                          torch.tensor([r["linf"] for r in recs], dtype=torch.float64), atol=1e-6)


def test_merge_carries_history_and_attack_time(tmp_path, data):
    model, full = run_full(tmp_path, data)
    for i in range(2):
        run_full(tmp_path, data, name=f"shard{i}", shard=(i, 2))
    merged = runner.merge_runs([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged")
    want, got = load_file(str(full / "history.safetensors")), load_file(str(merged / "history.safetensors"))
    assert want.keys() == got.keys()
    for k in want:  # bit for bit; NaN where a figure does not apply (angles of zero gradients)
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True)
    times = [json.loads(line)["seconds"] for i in range(2)
             for line in (tmp_path / f"shard{i}" / "batches.jsonl").read_text().splitlines()]
    assert len(times) == 4
    s = runner.finish_run(model, merged, data[0], latency_n=0, report=False)
    assert s["seconds"] == pytest.approx(sum(times))


def test_merge_refuses_a_directory_of_another_run(tmp_path, data):
    model, full = run_full(tmp_path, data)
    for i in range(2):
        run_full(tmp_path, data, name=f"shard{i}", shard=(i, 2))
    shards = [tmp_path / "shard0", tmp_path / "shard1"]
    other = tmp_path / "other"
    runner.run_attack(model, make_attack(model), config(seed=4, n=N - 3), *data, other, progress=False)
    before = {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()}
    with pytest.raises(DynattackError, match="not empty"):
        runner.merge_runs(shards, other)
    assert {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()} == before
    with pytest.raises(DynattackError, match="not empty"):
        runner.merge_runs(shards, shards[0])  # a source itself


def test_interrupted_merge_is_finished_by_the_same_merge_only(tmp_path, data, monkeypatch):
    model, full = run_full(tmp_path, data)
    for i in range(2):
        run_full(tmp_path, data, name=f"shard{i}", shard=(i, 2))
    shards = [tmp_path / "shard0", tmp_path / "shard1"]
    real_copy, copies = runner.copy_atomic, []

    def copy_then_die(src, dst):
        if len(copies) == 2:
            raise KeyboardInterrupt
        copies.append(dst)
        real_copy(src, dst)

    monkeypatch.setattr(runner, "copy_atomic", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        runner.merge_runs(shards, tmp_path / "merged")
    monkeypatch.undo()
    shutil.copytree(shards[1], tmp_path / "copy1")
    with pytest.raises(DynattackError, match="other shards"):
        runner.merge_runs([shards[0], tmp_path / "copy1"], tmp_path / "merged")
    runner.merge_runs(shards, tmp_path / "merged")
    assert_same_run(full, tmp_path / "merged")
    runner.merge_runs(shards, tmp_path / "merged")  # the same merge again: nothing changes
    assert_same_run(full, tmp_path / "merged")
