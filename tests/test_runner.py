"""The runner: resume after a kill or a full disk, shards merged, all equal to one uninterrupted run."""
import errno
import json

import pytest
import torch
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


def test_full_disk_keeps_finished_batches(tmp_path, data, monkeypatch):
    model, full = run_full(tmp_path, data)
    real_save = rundir.save_file
    calls = {"n": 0}

    def save_until_full(tensors, path):
        if "batch_00002" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        calls["n"] += 1
        real_save(tensors, path)

    monkeypatch.setattr(rundir, "save_file", save_until_full)
    part = tmp_path / "full-disk"
    model = ToyGated()
    with pytest.raises(DynattackError, match="No space left on device"):
        runner.run_attack(model, make_attack(model), config(), *data, part, progress=False)
    assert len(runner.read_records(part)) == 2 * BS
    assert not list((part / "adv").glob(".*.tmp"))
    monkeypatch.setattr(rundir, "save_file", real_save)
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
