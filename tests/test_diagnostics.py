"""dynattack.diagnostics (issue 16, item 4) and gates.force_named, on a hand-solvable toy.

ToyBlocked, input (1, 2, 2), pixels p0..p3 (reading order), mean p:

* ``gate_a``: q_a = 4 (0.5 - p0) - 1: on iff p0 <= 0.25; controls ``conv_a`` (1 -> 2 channels,
  weights 0, bias 1: its output is 1 everywhere);
* ``gate_b``: q_b = -1 + 3 mean(m_a conv_a(x)) = -1 + 3 m_a: on exactly when A is on, whatever
  the input: blocked by A only; controls ``conv_b`` (1 -> 8 channels);
* ``gate_dead``: q = -5 + 0 p0: never on (structural); controls ``conv_c`` (1 -> 4 channels);
* ``gate_ch`` (3 channel units): q_c = 8 (mean p - theta_c), theta = (0.3, 0.6, 2.0): channel 2
  can never run (mean p <= 1); controls the output channels of ``conv_ch`` (1 -> 3).

FLOPs by hand: a 3x3 conv with padding 1 on 2x2 costs 2 * cout * 9 * 4; static: the head,
Linear(17 * 4 -> 2), 2 * 68 * 2.
"""
import pytest
import torch
from torch import nn

from dynattack import cost
from dynattack.diagnostics import diagnose, exhaustive_forcing, on_alone, summarize_forcing
from dynattack.gates import Gate, Trace, force_named, gate_mode


def conv(cout):
    return 2 * cout * 9 * 4


COST = {"gate_a": conv(2), "gate_b": conv(8), "gate_dead": conv(4), "gate_ch": conv(3)}
STATIC = 2 * 68 * 2
FULL = STATIC + sum(COST.values())


class ToyBlocked(nn.Module):
    input_shape = (1, 2, 2)

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(1, 2, 3, padding=1)
        self.conv_b = nn.Conv2d(1, 8, 3, padding=1)
        self.conv_c = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_ch = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(17 * 4, 2)
        with torch.no_grad():
            self.conv_a.weight.zero_()
            self.conv_a.bias.fill_(1.0)
        self.register_buffer("theta", torch.tensor([0.3, 0.6, 2.0]))
        self.gate_a = Gate(controls=[self.conv_a])
        self.gate_b = Gate(controls=[self.conv_b])
        self.gate_dead = Gate(controls=[self.conv_c])
        self.gate_ch = Gate(controls=[self.conv_ch])

    def forward(self, x):
        b = x.shape[0]
        p = x.flatten(1)
        h_a = self.gate_a(4 * (0.5 - p[:, 0]) - 1).view(b, 1, 1, 1) * self.conv_a(x)
        h_b = self.gate_b(-1 + 3 * h_a.mean((1, 2, 3))).view(b, 1, 1, 1) * self.conv_b(x)
        h_c = self.gate_dead(-5 + 0 * p[:, 0]).view(b, 1, 1, 1) * self.conv_c(x)
        h_ch = self.gate_ch(8 * (p.mean(1, keepdim=True) - self.theta))[:, :, None, None] * self.conv_ch(x)
        return self.head(torch.cat([h_a, h_b, h_c, h_ch], 1).flatten(1))


@pytest.fixture(scope="module")
def toy():
    model = ToyBlocked()
    cost.calibrate(model, model.input_shape)
    return model.eval()


def clean_images(n=4):
    g = torch.Generator().manual_seed(0)
    return 0.5 + 0.04 * (torch.rand(n, 1, 2, 2, generator=g) - 0.5)


def hand_flops(x):
    """FLOPs of the natural run from the pixels (the docstring's formulas, not the model)."""
    p = x.flatten(1)
    a = p[:, 0] <= 0.25
    ch = (p.mean(1, keepdim=True) >= torch.tensor([0.3, 0.6, 2.0])).sum(1)
    return STATIC + a * (COST["gate_a"] + COST["gate_b"]) + ch * COST["gate_ch"] / 3


def test_calibration_matches_hand_costs(toy):
    assert cost.full_flops(toy) == FULL
    with Trace() as t, torch.no_grad():
        toy(clean_images())
    assert torch.equal(cost.executed_flops(toy, t), hand_flops(clean_images()).double())


def test_force_named_forces_only_the_named_gates_and_restores(toy):
    x = clean_images()
    with force_named(toy, on=["gate_a"]), Trace() as t, torch.no_grad():
        toy(x)
    d = {e.name: e.decision for e in t}
    assert d["gate_a"].all() and d["gate_b"].all()  # B follows A: on once A runs
    assert not d["gate_dead"].any()
    with force_named(toy, off=["gate_ch"]), Trace() as t, torch.no_grad():
        toy(x)
    assert not {e.name: e.decision for e in t}["gate_ch"].any()
    assert all(g.force is None and g.mode == "hard" for g in (toy.gate_a, toy.gate_ch))
    with gate_mode(toy, "lgm"):
        with force_named(toy, on=["gate_b"]):
            assert toy.gate_a.mode == "hard" and toy.gate_b.force == "on"
        assert toy.gate_a.mode == "lgm" and toy.gate_b.force is None
    with pytest.raises(ValueError, match="no gate named"):
        with force_named(toy, on=["nope"]):
            pass
    with pytest.raises(ValueError, match="both"):
        with force_named(toy, on=["gate_a"], off=["gate_a"]):
            pass


def test_on_alone_is_the_forced_on_logit_test(toy):
    alone = on_alone(toy, clean_images())
    assert not alone["gate_a"].any()  # A's logit does not depend on the others: off at p0 ~ 0.5
    assert alone["gate_b"].all()  # with A forced on, q_b = 2
    assert not alone["gate_dead"].any()
    assert alone["gate_ch"][:, 0].all() and not alone["gate_ch"][:, 1:].any()


def test_exhaustive_forcing_finds_the_blocking_subset(toy):
    ex = exhaustive_forcing(toy, clean_images())
    assert ex["gates"] == ["gate_a", "gate_b", "gate_dead"]
    assert any("gate_ch" in note for note in ex["notes"])  # the channel gate is left natural
    assert ex["subsets_run"] == 8  # one group (every image has the same 3 gates off): 2^3 subsets
    for p in ex["per_image"]:
        assert p["off"] == ["gate_a", "gate_b", "gate_dead"]
        assert p["switch_on"] == {"gate_a": None, "gate_b": ["gate_a"], "gate_dead": None}
        assert p["all_on_by_forcing"] == ["gate_a", "gate_dead"]  # B then runs by itself
        assert p["natural_all_on_possible"] is False  # A and dead never pass their own test here
        assert p["switched_off"] == {}
    s = summarize_forcing(ex)
    assert s["gates"]["gate_b"] == {"images_off": 4, "by_forcing": 4, "never": 0, "min_subset_median": 1,
                                    "switched_off_images": 0}
    assert s["gates"]["gate_dead"]["never"] == 4 and s["all_on_by_forcing"] == 4


def test_exhaustive_forcing_skips_images_with_too_many_off_gates(toy):
    ex = exhaustive_forcing(toy, clean_images(2), max_k=2)
    assert ex["subsets_run"] == 0 and all(p["skipped"] for p in ex["per_image"])
    assert any("not enumerated" in note for note in ex["notes"])


def test_without_probes_the_table_says_blocked_vs_never(toy):
    x = clean_images()
    d = diagnose(toy, x, None, probe_steps=0)
    rows = {r["gate"]: r for r in d.gates}
    assert rows["gate_b"]["off_end_alone_pct"] == 100.0  # on if the others were forced on
    assert rows["gate_b"]["units_ever_on_alone"] == 1
    assert rows["gate_b"]["units_never_on"] == 1  # but no tried input runs it: not evidence it can run
    for g in ("gate_a", "gate_dead"):  # off whatever the others do, at every tried input
        assert rows[g]["off_end_never_pct"] == 100.0 and rows[g]["units_never_on"] == 1
    # channel 0 on, 1 and 2 never on (no tried input reaches mean >= 0.6)
    assert rows["gate_ch"]["on_clean_pct"] == pytest.approx(100 / 3)
    assert rows["gate_ch"]["units_never_on"] == 2
    assert d.flops["reachable_mean"] == pytest.approx(STATIC + COST["gate_ch"] / 3)
    assert d.flops["full"] == FULL
    assert d.together["together_any"] == 0 and d.together["natural_all_on_end"] == 0


def test_probes_reach_every_unit_but_the_structural_ones(toy):
    x = clean_images()
    adv = x.clone()
    adv.view(len(x), -1)[:, 0] = 0.1  # A (so B) on
    adv.view(len(x), -1)[:, 1:] = 0.9  # mean 0.7: channels 0 and 1 on
    d = diagnose(toy, x, adv, probe_steps=30)
    rows = {r["gate"]: r for r in d.gates}
    assert rows["gate_dead"]["units_never_on"] == 1 and rows["gate_dead"]["off_end_never_pct"] == 100.0
    assert rows["gate_ch"]["units_never_on"] == 1 and rows["gate_ch"]["never_on_units"] == [[2]]
    assert rows["gate_a"]["units_never_on"] == 0 and rows["gate_b"]["units_never_on"] == 0
    assert rows["gate_a"]["on_end_pct"] == 100.0 and rows["gate_b"]["on_end_pct"] == 100.0
    reach = FULL - COST["gate_dead"] - COST["gate_ch"] / 3
    f_clean, f_adv = hand_flops(x).double(), hand_flops(adv).double()
    assert torch.allclose(f_adv, torch.full_like(f_adv, reach))
    assert d.flops["reachable_mean"] == pytest.approx(reach)
    assert d.flops["unreachable_units"] == 2 and d.flops["units"] == 6
    assert d.flops["unreachable_cost_pct"] == pytest.approx(100 * (FULL - reach) / (FULL - STATIC))
    saved_full, saved_reach = (FULL - f_clean).sum(), (reach - f_clean).sum()
    assert d.flops["recovery_full"] == pytest.approx(float((f_adv - f_clean).sum() / saved_full * 100))
    assert d.flops["recovery_reachable"] == pytest.approx(100.0)
    # exhaustive forcing at the attack's input: only the dead gate is off, and no subset helps it
    s = d.exhaustive["attack"]["summary"]
    assert s["gates"]["gate_dead"]["never"] == 4 and s["natural_all_on_possible"] == 0
    assert d.exhaustive["attack"]["subsets_run"] == 2
    # at the clean input: A, B and dead off; B switched on by forcing A
    c = d.exhaustive["clean"]["summary"]
    assert c["gates"]["gate_b"]["by_forcing"] == 4 and c["all_on_by_forcing"] == 4
    md = d.markdown("toy")
    assert "| gate_dead | 1 |" in md and "reachable maximum" in md


def test_proven_unreachable_units_are_excluded(toy):
    x = clean_images()
    adv = x.clone()
    adv.view(len(x), -1)[:, 0] = 0.1
    d = diagnose(toy, x, adv, probe_steps=0, exhaustive=(),
                 unreachable={"gate_ch": torch.tensor([False, True, True])})
    # reachable here: A and B (on at the attack's input), channel 0; not dead, not channels 1-2
    assert d.flops["reachable_mean"] == pytest.approx(STATIC + COST["gate_a"] + COST["gate_b"] + COST["gate_ch"] / 3)
    assert d.flops["recovery_reachable"] == pytest.approx(100.0)


@pytest.mark.parametrize("make", ["missing", "empty", "threads"])
def test_cli_diagnose_bad_run_dir_is_one_line_exit_2(tmp_path, capsys, make):
    from dynattack import cli

    run_dir = tmp_path / "run"
    if make != "missing":
        run_dir.mkdir()
    with pytest.raises(SystemExit) as exc:
        cli.main(["diagnose", str(run_dir), *(["--threads", "0"] if make == "threads" else [])])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynattack: error:") and "\n" not in err
    if make == "threads":
        assert "--threads must be >= 1" in err


def _package_imports(path):
    import ast

    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            out.add((node.module or "").split(".")[0] or next(a.name for a in node.names))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dynattack"):
            out.add(node.module.split(".")[1] if "." in node.module else node.names[0].name)
    return out


def test_diagnostics_imports_no_model_family_and_gates_nothing():
    from pathlib import Path

    import dynattack

    src = Path(dynattack.__file__).parent
    assert _package_imports(src / "diagnostics.py") <= {"gates", "cost", "metrics", "attacks", "errors"}
    assert _package_imports(src / "gates.py") == set()


def test_cli_diagnose_help():
    from dynattack import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["diagnose", "--help"])
    assert exc.value.code == 0
