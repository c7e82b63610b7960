"""`dynattack sweep`: one run directory per budget (each a normal run, the same records as
`dynattack attack --eps E`), sweep.json in increasing eps with each entry's eps equal to its run's
config, resumable, and bad budgets one line on stderr, exit 2, nothing written."""
import json

import pytest

from dynattack.rundir import SUMMARY_KEYS, load_config, read_records
from dynattack.sweep import budget_name, check_budgets
from dynattack.errors import DynattackError
from test_cli import assert_one_line_error_in_process, main_in_process

VICTIM = "skipnet38-rnn-hrl"
COMMON = ["--victim", VICTIM, "--n", "4", "--batch-size", "2", "--steps", "3", "--latency-n", "0", "--no-progress"]
EPS = "8/255,1/255,4/255"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, fashion_mnist_available):
    out = tmp_path_factory.mktemp("sweep") / "s"
    with pytest.raises(SystemExit) as exc:
        from dynattack import cli

        cli.main(["sweep", *COMMON, "--attack", "energy-pgd", "--eps", EPS, "--out", str(out)])
    assert exc.value.code == 0
    return out


def test_sweep_writes_one_run_per_budget(sweep_dir):
    result = json.loads((sweep_dir / "sweep.json").read_text())
    entries = result["sweep"]
    assert [e["eps"] for e in entries] == sorted([8 / 255, 1 / 255, 4 / 255])
    assert [e["run"] for e in entries] == ["eps_1-255", "eps_4-255", "eps_8-255"]
    for e in entries:
        run = sweep_dir / e["run"]
        config = load_config(run)
        assert config["params"]["eps"] == e["eps"] and config["attack"] == "energy-pgd"
        summary = json.loads((run / "summary.json").read_text())
        assert set(SUMMARY_KEYS) <= set(summary)
        assert summary["recovery_pct"] == e["recovery_pct"] and summary["l2"] == e["l2"]
        records = read_records(run)
        assert len(records) == 4 == e["n"]
        assert max(r["linf"] for r in records) <= e["eps"]
        assert e["success_pct"] == 100 * sum(r["success"] for r in records) / 4
    assert (sweep_dir / "sweep.png").stat().st_size > 1000


def test_a_budget_run_is_the_run_attack_writes(sweep_dir, tmp_path, capsys):
    out = tmp_path / "single"
    code, _, err = main_in_process(capsys, "attack", *COMMON, "--attack", "energy-pgd", "--eps", "4/255",
                                   "--out", str(out))
    assert code == 0, err
    assert load_config(out) == load_config(sweep_dir / "eps_4-255")
    assert read_records(out) == read_records(sweep_dir / "eps_4-255")


def test_sweep_is_resumable_and_refuses_a_rerun(sweep_dir, capsys):
    args = ["sweep", *COMMON, "--attack", "energy-pgd", "--eps", EPS, "--out", str(sweep_dir)]
    assert_one_line_error_in_process(capsys, args, "already holds a sweep", "--resume")
    before = {e: read_records(sweep_dir / e) for e in ("eps_1-255", "eps_4-255", "eps_8-255")}
    sweep_before = json.loads((sweep_dir / "sweep.json").read_text())
    # a sweep killed in its last budget's second batch: that run's summary and last lines are gone
    run = sweep_dir / "eps_8-255"
    (run / "summary.json").unlink()
    lines = (run / "samples.jsonl").read_text().splitlines(keepends=True)
    (run / "samples.jsonl").write_text("".join(lines[:2]))
    code, out, err = main_in_process(capsys, *args, "--resume")
    assert code == 0, err
    assert {e: read_records(sweep_dir / e) for e in before} == before
    assert json.loads((sweep_dir / "sweep.json").read_text()) == sweep_before
    # another sweep in the same directory is refused
    other = ["sweep", *COMMON, "--attack", "energy-pgd", "--eps", "2/255", "--out", str(sweep_dir), "--resume"]
    assert_one_line_error_in_process(capsys, other, "another sweep")


@pytest.mark.parametrize("extra, needle", [
    (["--eps", ""], "comma-separated"),
    (["--eps", "1/255,,2/255"], "comma-separated"),
    (["--eps", "-1/255"], "> 0"),
    (["--eps", "0,1/255"], "> 0"),
    (["--eps", "2"], "(0, 1]"),
    (["--eps", "1/255,abc"], "not a number"),
    (["--eps", "8/0"], "8/0"),
    (["--eps", "1/255,1/255"], "twice"),
    (["--eps", "1/255", "--attack", "gradauto"], "takes no eps"),
    (["--eps", "1/255", "--attack", "ilfo"], "takes no eps"),
    (["--eps", "1/255", "--attack", "nope"], "unknown attack"),
    (["--eps", "1/255", "--param", "eps=0.1"], "--param eps"),
    (["--eps", "1/255", "--param", "bogus=1"], "unknown parameter"),
    (["--eps", "1/255", "--n", "0"], "--n"),
])
def test_bad_sweeps_are_one_line_and_write_nothing(capsys, tmp_path, extra, needle):
    out = tmp_path / "never"
    args = ["sweep", "--victim", VICTIM, "--n", "2", "--latency-n", "0", "--no-progress", "--out", str(out), *extra]
    assert_one_line_error_in_process(capsys, args, needle)
    assert not out.exists()


def test_budgets_in_metres_and_their_names():
    assert check_budgets([0.05, 2.0, 0.01], points=True) == [0.01, 0.05, 2.0]
    with pytest.raises(DynattackError):
        check_budgets([2.0], points=False)
    with pytest.raises(DynattackError):
        check_budgets([], points=False)
    with pytest.raises(DynattackError):
        check_budgets([True], points=False)
    assert budget_name(16 / 255, False) == "eps_16-255"
    assert budget_name(0.05, False) == "eps_0.05"
    assert budget_name(0.02, True) == "eps_0.02m"


def test_sweep_usage_and_out_errors(capsys, tmp_path):
    code, out, _ = main_in_process(capsys, "sweep", "--help")
    assert code == 0 and "--eps" in out
    line = assert_one_line_error_in_process(capsys, ["sweep", "--victim", VICTIM, "--out", str(tmp_path / "x")], "--eps")
    assert "--help" in line
    base = ["sweep", "--victim", VICTIM, "--eps", "1/255", "--no-progress"]
    assert_one_line_error_in_process(capsys, [*base, "--out", str(tmp_path / "r"), "--latency-n", "-1"], "--latency-n")
    assert_one_line_error_in_process(capsys, [*base, "--out", str(tmp_path / "r"), "--threads", "0"], "--threads")
    assert_one_line_error_in_process(capsys, ["sweep", "--victim", "nope", "--eps", "1/255", "--out",
                                              str(tmp_path / "r")], "nope")
    assert not (tmp_path / "r").exists()
    (tmp_path / "file").write_text("x")
    assert_one_line_error_in_process(capsys, [*base, "--out", str(tmp_path / "file")], "is a file")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_one_line_error_in_process(capsys, [*base, "--out", str(other)], "not empty")
    assert_one_line_error_in_process(capsys, [*base, "--out", str(other), "--resume"], "not empty")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
