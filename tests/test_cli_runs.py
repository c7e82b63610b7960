"""`dynattack attack` end to end: a run killed by a signal and resumed, and a two-process torchrun
run, each equal to one uninterrupted run; bad input of every kind -> one line, exit 2."""
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

from dynattack import runner
from dynattack.models import get_spec
from test_cli import ROOT, assert_one_line_error
from test_cli import run_cli as run_cli_any_threads

# CPU kernels reduce in an order that depends on the thread count: bit-for-bit comparisons need
# the same count in every process.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_cli(*args):
    return run_cli_any_threads(*args, env=ONE_THREAD)

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
    return records, shards, {k: v for k, v in summary.items() if k not in runner.TIMING_KEYS}


def assert_same(a, b):
    rec_a, sh_a, sum_a = load_run(a)
    rec_b, sh_b, sum_b = load_run(b)
    assert rec_a == rec_b and sum_a == sum_b
    assert sh_a.keys() == sh_b.keys() and len(sh_a) == 3
    for name in sh_a:
        for key in sh_a[name]:
            assert torch.equal(sh_a[name][key], sh_b[name][key]), (name, key)


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


def test_shard_directories_merge_to_the_same_result(tmp_path, weights, reference):
    dirs = []
    for i in range(2):
        d = tmp_path / f"shard{i}"
        proc = run_cli(*BASE, "--weights", str(weights), "--out", str(d), "--shard", f"{i}/2")
        assert proc.returncode == 0, proc.stderr
        dirs.append(d)
    proc = run_cli("merge", *map(str, dirs), "--out", str(tmp_path / "merged"), "--latency-n", "0")
    assert proc.returncode == 0, proc.stderr
    assert_same(reference, tmp_path / "merged")


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
