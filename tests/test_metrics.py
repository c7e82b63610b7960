"""Metrics against hand-solved examples and plain loops."""
from __future__ import annotations

import math

import pytest
import torch

from dynattack.gates import Gate, Trace
from dynattack.metrics import (
    accuracy,
    arch_change,
    arch_change_positions,
    arch_change_skipnet,
    correct,
    decisions,
    execution_rates,
    execution_rates_by_class,
    input_dependence,
    l2,
    linf,
    miou,
    psnr,
    psnr_mean,
    unit_decisions,
)


def test_accuracy_and_correct():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0], [1.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 2])
    assert correct(logits, labels).tolist() == [True, False, True, True]
    assert accuracy(logits, labels) == 0.75
    assert math.isnan(accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))


def test_psnr_constant_offset_is_20_db():
    clean = torch.rand(3, 3, 8, 8) * 0.8
    assert torch.allclose(psnr(clean, clean + 0.1), torch.full((3,), 20.0, dtype=torch.float64), atol=1e-4)


def test_psnr_per_sample_identical_and_mean():
    clean = torch.full((3, 1, 2, 2), 0.5, dtype=torch.float64)
    adv = clean.clone()
    adv[0] += 0.1  # MSE 0.01 -> 20 dB
    adv[1, 0, 0, :] += 0.2  # half the values off by 0.2: MSE 0.02 -> 10 log10(50)
    values = psnr(clean, adv)  # sample 2 unchanged
    assert values[0].item() == pytest.approx(20.0)
    assert values[1].item() == pytest.approx(10 * math.log10(50))
    assert values[2].item() == math.inf
    mean, identical = psnr_mean(values)
    assert mean == pytest.approx((20.0 + 10 * math.log10(50)) / 2) and identical == 1
    assert psnr_mean([values[:1], values[1:]]) == (mean, identical)
    mean, identical = psnr_mean(psnr(clean, clean))
    assert math.isnan(mean) and identical == 3
    with pytest.raises(ValueError):
        psnr(clean, adv[:2])


def test_l2_and_linf():
    clean = torch.zeros(2, 1, 2, 2)
    adv = torch.tensor([[[[0.3, 0.0], [0.0, -0.4]]], [[[0.1, 0.1], [0.1, 0.1]]]])
    assert torch.allclose(l2(clean, adv), torch.tensor([0.5, 0.2], dtype=torch.float64))
    assert torch.allclose(linf(clean, adv), torch.tensor([0.4, 0.1], dtype=torch.float64))


# --- architecture change -----------------------------------------------------------------------


def test_arch_change_on_decision_tensors():
    clean = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    # differing decisions per sample: 1, 3, 4 of 4
    assert arch_change(clean, adv) == pytest.approx(100 * 8 / 12)
    ok = torch.tensor([True, True, False])
    assert arch_change_skipnet(clean, adv, ok) == pytest.approx(100 * 4 / 8)
    assert arch_change_positions(clean, adv) == pytest.approx(100 * 8 / 12)
    assert math.isnan(arch_change_skipnet(clean, adv, torch.zeros(3, dtype=torch.bool)))
    # per-batch lists give the pooled ratio, not a mean of ratios
    assert arch_change_skipnet([clean[:1], clean[1:]], [adv[:1], adv[1:]], [ok[:1], ok[1:]]) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        arch_change(clean, adv[:, :3])


def run_gates(logits: dict[str, torch.Tensor]) -> Trace:
    """A trace as a family would record it: each named gate called once on its logits."""
    with Trace() as trace:
        for name, q in logits.items():
            gate = Gate()
            gate.name = name
            gate(q)
    return trace


def test_arch_change_on_traces_with_positions_and_dilated_masks():
    # two samples; a block gate (unit shape ()), a 2x2 position mask and its "dilated" twin
    clean = run_gates({
        "block": torch.tensor([1.0, -1.0]),
        "mask": torch.tensor([[[1.0, -1.0], [-1.0, -1.0]], [[1.0, 1.0], [1.0, 1.0]]]),
        "mask.dilated": torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]),
    })
    adv = run_gates({
        "block": torch.tensor([1.0, 1.0]),  # sample 1 changes
        "mask": torch.tensor([[[1.0, 1.0], [1.0, -1.0]], [[1.0, 1.0], [1.0, 1.0]]]),  # 2 positions of sample 0
        "mask.dilated": torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[-1.0, 1.0], [1.0, 1.0]]]),  # 1 of sample 1
    })
    assert decisions(clean).shape == (2, 9)
    # 4 differing decisions among 2 samples x 9 units
    assert arch_change_positions(clean, adv) == pytest.approx(100 * 4 / 18)
    # only sample 0 correct: 2 of its 9 decisions differ
    assert arch_change_skipnet(clean, adv, torch.tensor([True, False])) == pytest.approx(100 * 2 / 9)

    other = run_gates({"block": torch.tensor([1.0, 1.0]), "other": torch.zeros(2, 2, 2), "mask.dilated": torch.zeros(2, 2, 2)})
    with pytest.raises(ValueError, match="different gate events"):
        arch_change(clean, other)


# --- execution rates ---------------------------------------------------------------------------


def test_execution_rates():
    trace = run_gates({"g1": torch.tensor([1.0, -1.0, 1.0, 1.0]), "g2": torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])})
    rates = execution_rates(trace)
    assert list(rates) == ["g1", "g2"]
    assert rates["g1"] == pytest.approx(0.75) and rates["g2"] == pytest.approx(1 / 6)
    second = run_gates({"g1": torch.tensor([-1.0, -1.0, -1.0, -1.0]), "g2": torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])})
    pooled = execution_rates([trace, second])
    assert pooled["g1"] == pytest.approx(3 / 8) and pooled["g2"] == pytest.approx(7 / 12)


def test_input_dependence_hand_solved():
    # 4 samples, classes 0 0 1 1; gate "a": one unit, on for samples 0 and 2; gate "b": two
    # units, unit 0 always on, unit 1 on only for sample 3
    batch = {"a": torch.tensor([[1], [0], [1], [0]], dtype=torch.bool),
             "b": torch.tensor([[1, 0], [1, 0], [1, 0], [1, 1]], dtype=torch.bool)}
    dep = input_dependence(batch, torch.tensor([0, 0, 1, 1]), 2)
    assert dep["varying_decisions_pct"] == pytest.approx(100 * 2 / 3)  # units a and b.1 vary, b.0 does not
    assert dep["minority_decisions_pct"] == pytest.approx(100 * (0.5 + 0 + 0.25) / 3)
    # per-class rates: a 0.5 / 0.5 (spread 0); b (share of its 2 units) 0.5 / 0.75 (spread 0.25)
    assert dep["class_spread_pct_mean"] == pytest.approx(100 * 0.125)
    assert dep["class_spread_pct_max"] == pytest.approx(25.0)
    # the same split into batches, the second without gate "a" (no row reached it: all off)
    first = {k: v[:2] for k, v in batch.items()}
    second = {"b": batch["b"][2:]}
    split = input_dependence([first, second], [torch.tensor([0, 0]), torch.tensor([1, 1])], 2)
    assert split["varying_decisions_pct"] == pytest.approx(100 * 2 / 3)  # a: on, off, off, off
    assert split["minority_decisions_pct"] == pytest.approx(100 * (0.25 + 0 + 0.25) / 3)
    with pytest.raises(ValueError, match="labels"):
        input_dependence(batch, torch.tensor([0, 1]), 2)


def test_unit_decisions_of_a_trace_match_its_gates():
    logits = {"block": torch.tensor([1.0, -1.0, 2.0]), "mask": torch.tensor([[[1.0, -1.0]], [[-1.0, -1.0]], [[1.0, 1.0]]])}
    units = unit_decisions(run_gates(logits))
    assert list(units) == ["block", "mask"]
    assert units["block"].tolist() == [[True], [False], [True]]
    assert units["mask"].tolist() == [[True, False], [False, False], [True, True]]
    gen = torch.Generator().manual_seed(2)
    rates = torch.rand(30, 5, generator=gen) > 0.5
    labels = torch.randint(0, 3, (30,), generator=gen)
    dep = input_dependence({"g": rates}, labels, 3)
    p = rates.double().mean(0)
    assert dep["varying_decisions_pct"] == pytest.approx(100 * float(((p > 0) & (p < 1)).double().mean()))
    per_class = [float(rates[labels == c].double().mean()) for c in range(3)]
    assert dep["class_spread_pct_max"] == pytest.approx(100 * (max(per_class) - min(per_class)))


def by_class_loop(rates: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    out = torch.full((rates.shape[1], num_classes), math.nan, dtype=torch.float64)
    for g in range(rates.shape[1]):
        for c in range(num_classes):
            values = [rates[n, g].item() for n in range(len(labels)) if labels[n] == c]
            if values:
                out[g, c] = sum(values) / len(values)
    return out


def test_execution_rates_by_class_tensor_matches_loop():
    gen = torch.Generator().manual_seed(0)
    dec = torch.rand(40, 6, generator=gen) > 0.4
    labels = torch.randint(0, 4, (40,), generator=gen)  # class 4 has no sample
    table = execution_rates_by_class(dec, labels, 5)
    assert table.shape == (6, 5)
    assert torch.allclose(table, by_class_loop(dec.double(), labels, 5), equal_nan=True)
    assert torch.isnan(table[:, 4]).all()
    batched = execution_rates_by_class([dec[:15], dec[15:]], [labels[:15], labels[15:]], 5)
    assert torch.allclose(batched, table, equal_nan=True)


def test_execution_rates_by_class_from_traces_matches_loop():
    gen = torch.Generator().manual_seed(1)
    traces, labels, per_sample = [], [], []
    for batch in (5, 7):
        block = torch.randn(batch, generator=gen)
        channels = torch.randn(batch, 4, generator=gen)
        traces.append(run_gates({"block": block, "channels": channels}))
        labels.append(torch.randint(0, 3, (batch,), generator=gen))
        per_sample.append(torch.stack([(block >= 0).double(), (channels >= 0).double().mean(1)], dim=1))
    table = execution_rates_by_class(traces, labels, 3)
    expected = by_class_loop(torch.cat(per_sample), torch.cat(labels), 3)
    assert torch.allclose(table, expected, equal_nan=True)


# --- mIoU --------------------------------------------------------------------------------------


def test_miou_hand_solved():
    target = torch.tensor([0, 0, 1, 1, 2, -100])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    mean, per_class = miou(pred, target, num_classes=4)
    # class 0: I=1, U=3; class 1: I=2, U=3; class 2: I=0, U=1; class 3 absent from both
    assert per_class[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(per_class[3].item())
    assert mean == pytest.approx(1 / 3)
    assert miou([pred[:2], pred[2:]], [target[:2], target[2:]], 4)[0] == pytest.approx(mean)
    with pytest.raises(ValueError):
        miou(torch.tensor([5]), torch.tensor([0]), 4)


def test_miou_perfect_and_2d():
    target = torch.tensor([[0, 2], [2, 2]])
    mean, per_class = miou(target.clone(), target, 3)
    assert mean == 1.0 and math.isnan(per_class[1].item())
