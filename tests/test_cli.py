"""The command line: bad input ends in one clear line on stderr, exit code 2, no traceback."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from dynattack import cli
from dynattack.models import get_spec
from dynattack.runner import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dynattack", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def main_in_process(capsys, *args):
    """(exit code, stdout, stderr) of ``dynattack ARGS`` run in this process."""
    with pytest.raises(SystemExit) as exc:
        cli.main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_one_line_error_in_process(capsys, args, *needles):
    code, out, err = main_in_process(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dynattack: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "resnet20.safetensors"
    model = get_spec("resnet20-fmnist").build()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("EVIL_MARK", "/tmp/dynattack-evil-mark"),))


def test_unknown_model():
    assert_one_line_error(run_cli("eval", "no-such-net"), "unknown model", "resnet20-fmnist")


def test_missing_dataset_directory(tmp_path, random_weights):
    missing = tmp_path / "nowhere"
    proc = run_cli("eval", "resnet20-fmnist", "--weights", str(random_weights), "--data", str(missing), "--n", "8")
    assert_one_line_error(proc, str(missing), "dataset-fashion-mnist")


def test_corrupt_and_truncated_weights(tmp_path, random_weights):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    assert_one_line_error(run_cli("eval", "resnet20-fmnist", "--weights", str(garbage)), "corrupt")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(random_weights.read_bytes()[:-1000])
    assert_one_line_error(run_cli("eval", "resnet20-fmnist", "--weights", str(truncated)), "corrupt")


def test_pth_that_needs_unpickling_code_is_refused(tmp_path):
    mark = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    os.environ["EVIL_MARK"] = str(mark)
    try:
        torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": Evil()}, str(path))
    finally:
        del os.environ["EVIL_MARK"]
    proc = run_cli("eval", "resnet20-fmnist", "--weights", str(path))
    assert_one_line_error(proc, "unpickling")
    assert not mark.exists(), "the checkpoint's code must never run"


def test_mismatched_weights_list_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"not.a.key": torch.zeros(2)}, str(path))
    assert_one_line_error(run_cli("eval", "resnet20-fmnist", "--weights", str(path)), "missing keys", "not.a.key")


def test_help_on_every_command():
    for cmd in ([], ["models"], ["train"], ["eval"]):
        proc = run_cli(*cmd, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout


def test_models_lists_the_zoo():
    proc = run_cli("models")
    assert proc.returncode == 0
    assert "resnet20-fmnist" in proc.stdout
    from dynattack.models import list_models

    for m in list_models():  # each shipped victim's line shows its card's score (mIoU for point victims)
        card = m["card"]
        if card:
            line = next(row for row in proc.stdout.splitlines() if row.startswith(m["name"] + " "))
            assert f"{100 * card.get('miou', card['accuracy']):.2f} %" in line


USAGE_ERRORS = [
    (["attack", "--n", "abc"], "--n"),
    (["attack", "--victim", "v", "--attack", "a"], "--out"),
    (["merge", "--out", "x"], "shards"),
    (["eval", "resnet20-fmnist", "--latency-n", "many"], "--latency-n"),
    (["train"], "name"),
    (["report"], "run_dir"),
    (["demo", "--steps", "1.5"], "--steps"),
    (["models", "--bogus"], "--bogus"),
    (["no-such-command"], "no-such-command"),
]


@pytest.mark.parametrize("args,needle", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line(capsys, args, needle):
    line = assert_one_line_error_in_process(capsys, args, needle)
    assert "--help" in line  # where to look next


def test_usage_error_from_the_shell_is_one_line():
    assert_one_line_error(run_cli("attack", "--n", "abc"), "dynattack: error: ", "--n")


def test_no_arguments_still_shows_the_help(capsys):
    code, out, err = main_in_process(capsys)
    assert "Usage" in out + err and "attack" in out + err


@pytest.mark.parametrize("command", [["attack", "--victim", "nope", "--attack", "gradauto"], ["merge", "somewhere"]])
def test_negative_latency_n_is_refused(capsys, tmp_path, command):
    assert_one_line_error_in_process(capsys, [*command, "--out", str(tmp_path / "run"), "--latency-n", "-1"],
                                     "--latency-n")
    assert not (tmp_path / "run").exists()


def test_negative_threads_is_refused(capsys, tmp_path):
    assert_one_line_error_in_process(capsys, ["attack", "--victim", "nope", "--attack", "gradauto", "--out",
                                              str(tmp_path / "run"), "--threads", "0"], "--threads")


def test_demo_rerun_with_other_options_says_what_to_do(capsys, tmp_path):
    previous = tmp_path / "demo" / "gradauto"
    previous.mkdir(parents=True)
    config = RunConfig(victim="skipnet38-rnn-hrl", attack="gradauto", params={"steps": 300}, n=50, batch_size=50)
    (previous / "config.json").write_text(json.dumps(config.to_json()))
    line = assert_one_line_error_in_process(capsys, ["demo", "--n", "20", "--out", str(tmp_path / "demo")],
                                            "--n 50", "another --out", "remove")
    assert "--resume" not in line  # demo has no --resume
