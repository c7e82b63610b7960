"""`dynattack attack` end to end: a run killed by a signal and resumed, and a two-process torchrun
run, each equal to one uninterrupted run; bad input of every kind -> one line, exit 2."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dynattack import rundir, runner
from dynattack.models import get_spec
from test_cli import ROOT, assert_one_line_error, assert_one_line_error_in_process
from test_cli import run_cli as run_cli_any_threads

# CPU kernels reduce in an order that depends on the thread count: bit-for-bit comparisons need
# the same count in every process.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_cli(*args, env=ONE_THREAD):
    return run_cli_any_threads(*args, env=env)

VICTIM = "skipnet38-rnn-sp"
BASE = ["attack", "--victim", VICTIM, "--attack", "gradauto", "--n", "6", "--batch-size", "2", "--steps", "4",
        "--latency-n", "0", "--no-progress"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random-init victim weights with running statistics that make the gates vary."""
    torch.manual_seed(0)
    model = get_spec(VICTIM).build()
    path = tmp_path_factory.mktemp("victim") / "random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, weights):
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    proc = run_cli(*BASE, "--weights", str(weights), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def load_run(run_dir):
    records = runner.read_records(run_dir)
    shards = {p.name: load_file(str(p)) for p in sorted((run_dir / "adv").glob("*.safetensors"))}
    summary = json.loads((run_dir / "summary.json").read_text())
    history = load_file(str(run_dir / "history.safetensors"))
    return records, shards, {k: v for k, v in summary.items() if k not in runner.TIMING_KEYS}, history


def assert_same(a, b):
    rec_a, sh_a, sum_a, hist_a = load_run(a)
    rec_b, sh_b, sum_b, hist_b = load_run(b)
    assert rec_a == rec_b and sum_a == sum_b
    assert sh_a.keys() == sh_b.keys() and len(sh_a) == 3
    for name in sh_a:
        for key in sh_a[name]:
            assert torch.equal(sh_a[name][key], sh_b[name][key]), (name, key)
    assert hist_a.keys() == hist_b.keys()
    for key in hist_a:  # NaN where a figure does not apply (the angle of a zero gradient)
        torch.testing.assert_close(hist_b[key], hist_a[key], rtol=0, atol=0, equal_nan=True)


def batch_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "batches.jsonl").read_text().splitlines()]


def assert_seconds_sum_batches(run_dir, *sources):
    """The summary's attack time is the sum of every batch's, in whichever process ran it."""
    times = {b["batch"]: b["seconds"] for d in sources for b in batch_lines(d)}
    assert sorted(times) == [0, 1, 2]
    assert json.loads((run_dir / "summary.json").read_text())["seconds"] == pytest.approx(sum(times.values()))


def test_run_writes_the_design_files(reference):
    for name in ("config.json", "samples.jsonl", "summary.json", "report.html", "gates.json"):
        assert (reference / name).is_file(), name
    summary = json.loads((reference / "summary.json").read_text())
    assert set(summary) == set(runner.SUMMARY_KEYS)
    assert summary["victim"] == VICTIM and summary["n"] == 6
    assert list((reference / "figures").glob("*.png"))


def test_killed_run_resumes_to_the_same_result(tmp_path, weights, reference):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dynattack", *BASE, "--weights", str(weights), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ONE_THREAD},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = out / "samples.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if samples.exists() and len(samples.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    done = len(runner.read_records(out))
    assert 2 <= done < 6
    again = run_cli(*BASE, "--weights", str(weights), "--out", str(out))
    assert_one_line_error(again, "--resume")
    resumed = run_cli(*BASE, "--weights", str(weights), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same(reference, out)


def test_torchrun_two_processes_merge_to_the_same_result(tmp_path, weights, reference):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tmp_path / "torchrun"
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "dynattack",
         *["--images" if a == "--n" else a for a in BASE], "--weights", str(weights),
         "--out", str(out), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "ranks" / "rank1" / "samples.jsonl").exists()
    assert_same(reference, out)
    ranks = [out / "ranks" / f"rank{r}" for r in range(2)]
    assert_seconds_sum_batches(out, *ranks)
    assert {b["threads"] for b in batch_lines(out)} == {1}  # torchrun's OMP_NUM_THREADS=1, recorded


def test_shard_directories_merge_to_the_same_result(tmp_path, weights, reference):
    dirs = []
    for i in range(2):
        d = tmp_path / f"shard{i}"
        # --threads sets the count the environment would have set otherwise (the reference ran on 1)
        proc = run_cli(*BASE, "--weights", str(weights), "--out", str(d), "--shard", f"{i}/2", "--threads", "1",
                       env={"OMP_NUM_THREADS": "2"})
        assert proc.returncode == 0, proc.stderr
        dirs.append(d)
    proc = run_cli("merge", *map(str, dirs), "--out", str(tmp_path / "merged"), "--latency-n", "0")
    assert proc.returncode == 0, proc.stderr
    assert_same(reference, tmp_path / "merged")
    assert_seconds_sum_batches(tmp_path / "merged", *dirs)
    figures = [sorted(p.name for p in (d / "figures").glob("*.png")) for d in (reference, tmp_path / "merged")]
    assert figures[0] == figures[1] and "gate_values.png" in figures[0]  # the history's figures too
    assert {b["threads"] for b in batch_lines(tmp_path / "merged")} == {1}
    # a merge into a directory of another run neither mixes with it nor overwrites it
    other = tmp_path / "other"
    shutil.copytree(reference, other)
    before = sorted((p.relative_to(other), p.read_bytes()) for p in other.rglob("*") if p.is_file())
    assert_one_line_error(run_cli("merge", *map(str, dirs), "--out", str(other), "--latency-n", "0"), "not empty")
    assert sorted((p.relative_to(other), p.read_bytes()) for p in other.rglob("*") if p.is_file()) == before


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    for cls in ("a", "b"):
        (root / cls).mkdir()
        for k in range(2):
            Image.new("RGB", (28, 28), (40 * k, 90, 200)).save(root / cls / f"{k}.png")
    return root


BAD_INPUTS = [
    (["--victim", "nope"], "unknown model"),
    (["--attack", "nope"], "unknown attack"),
    (["--attack", "fgsm", "--eps", "0"], "eps"),
    (["--attack", "fgsm", "--eps", "-1/255"], "eps"),
    (["--attack", "fgsm", "--eps", "2"], "eps"),
    (["--attack", "fgsm", "--eps", "8/0"], "8/0"),
    (["--param", "K"], "key=value"),
    (["--param", "not_a_param=1"], "not_a_param"),
    (["--param", "K=-1"], "K"),
    (["--shard", "2/2"], "--shard"),
    (["--n", "0"], "--n"),
    (["--offset", "9999"], "exceeds"),
    (["--device", "cuda:7"], "cuda"),
]


@pytest.mark.parametrize("extra,needle", BAD_INPUTS, ids=[" ".join(e) for e, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line(tmp_path, weights, extra, needle):
    args = list(BASE)
    for flag_at in range(0, len(extra), 2):  # later flags override the base ones
        flag = extra[flag_at]
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    proc = run_cli(*args, *extra, "--weights", str(weights), "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_wrong_channels_or_size_for_the_victim(tmp_path, weights, rgb_folder):
    proc = run_cli(*BASE, "--weights", str(weights), "--out", str(tmp_path / "run"), "--dataset", "folder",
                   "--data", str(rgb_folder), "--n", "2")
    assert_one_line_error(proc, "shape")


def test_resume_of_another_config_keeps_the_finished_run(tmp_path, weights, reference):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    before = (out / "samples.jsonl").read_text(), (out / "summary.json").read_text()
    proc = run_cli(*BASE, "--weights", str(weights), "--out", str(out), "--resume", "--seed", "9")
    assert_one_line_error(proc, "another configuration")
    assert ((out / "samples.jsonl").read_text(), (out / "summary.json").read_text()) == before


def test_corrupt_shard_is_reported(tmp_path, weights, reference):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    shard = out / "adv" / "batch_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    proc = run_cli("merge", str(out), "--out", str(tmp_path / "merged"), "--latency-n", "3")
    assert_one_line_error(proc, "batch_00001")


def unwritable_places(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    return {"an existing file": (str(a_file), "is a file"), "under a file": (str(a_file / "run"), "is under"),
            "/proc": ("/proc/dynattack-run", "cannot write"), "empty": ("", "--out is empty")}


@pytest.mark.parametrize("place", ["an existing file", "under a file", "/proc", "empty"])
@pytest.mark.parametrize("command", ["attack", "merge", "demo"])
def test_unwritable_out_is_refused_before_any_work(capsys, tmp_path, place, command):
    out, needle = unwritable_places(tmp_path)[place]
    # an unknown victim (or missing shards) would be reported later: the output is checked first
    args = {"attack": ["attack", "--victim", "nope", "--attack", "nope"], "merge": ["merge", str(tmp_path / "none")],
            "demo": ["demo", "--victim", "nope"]}[command]
    assert_one_line_error_in_process(capsys, [*args, "--out", out], needle)


def test_out_holding_something_else_is_refused_before_any_work(capsys, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error_in_process(capsys, ["attack", "--victim", "nope", "--attack", "nope", "--out", str(out)],
                                     "not empty")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_read_only_mount_is_refused_before_any_work(capsys, tmp_path, monkeypatch):
    # chmod 0o500 does not stop root: emulate the read-only file system where the probe is created
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(rundir.tempfile, "mkstemp", read_only)
    assert_one_line_error_in_process(capsys, ["attack", "--victim", "nope", "--attack", "nope", "--out",
                                              str(tmp_path / "run")], "Read-only file system")
    assert not (tmp_path / "run").exists()
