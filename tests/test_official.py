"""Official SkipNet and DynConv checkpoints by name, from the command line (issue 15).

Checkpoints are random official-layout state_dicts (tests/test_skipnet.py, tests/test_dynconv.py)
saved the way the official training scripts save them; the expected figures come from the
functional re-implementations of the official forwards there, on fake CIFAR python files
written here with plain pickle.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from dynattack.cli import main
from dynattack.data import load_dataset
from dynattack.errors import DynattackError
from dynattack.gates import Trace
from dynattack.models import create_model, fitting_models, get_spec, list_models, load_weights
from dynattack.models.dynconv import dynconv_cifar
from dynattack.models.skipnet import CIFAR10_MEAN, CIFAR10_STD, skipnet_cifar, skipnet_imagenet
from model_helpers import assert_logits_close
from test_dynconv import official_state_dict as dynconv_official_state_dict
from test_skipnet import centre_official_gates, official_forward, official_state_dict

MEAN, STD = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)


def save_like_official(sd: dict, path, arch: str) -> None:
    """As the release's train_sp.py / train_rl.py save it: DataParallel's `module.` prefix inside
    {'epoch', 'arch', 'state_dict', 'best_prec1'}."""
    torch.save({"epoch": 350, "arch": arch, "state_dict": {"module." + k: v for k, v in sd.items()},
                "best_prec1": 93.4}, path)


def write_cifar(folder, images: torch.Tensor, labels: list[int], cifar100: bool = False) -> None:
    """Images in [0, 1] (exact multiples of 1/255) as the standard python file: CIFAR-10's
    `test_batch` (b'labels') or CIFAR-100's `test` (b'fine_labels', b'coarse_labels')."""
    data = (images * 255).round().to(torch.uint8).reshape(len(images), -1).numpy()
    if cifar100:
        batch = {b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels), b"filenames": []}
    else:
        batch = {b"data": data, b"labels": labels, b"batch_label": b"testing batch 1 of 1"}
    with open(folder / ("test" if cifar100 else "test_batch"), "wb") as f:
        pickle.dump(batch, f, protocol=2)


def fake_images(count: int, seed: int = 1) -> torch.Tensor:
    """Images with different brightness (their gate features differ), quantised to bytes."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(count, 3, 32, 32, generator=gen) * torch.linspace(0.2, 1.0, count).view(-1, 1, 1, 1)
    return (x * 255).round() / 255


def one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("dynattack: error: ") and err.count("\n") == 1, err
    return err


def table(out: str) -> dict[str, str]:
    """The two-column table `dynattack eval` prints, as {metric: value}."""
    return {line[:line.index("  ")]: line[line.index("  "):].strip() for line in out.splitlines()[2:] if "  " in line}


@pytest.mark.parametrize("name,n,gate,cifar100", [
    ("skipnet38-ff-cifar10-official", 6, "ffgate1", False),
    ("skipnet110-rnn-cifar100-official", 18, "rnn", True),
])
def test_eval_official_checkpoint_by_name(capsys, tmp_path, name, n, gate, cifar100):
    classes = 100 if cifar100 else 10
    sd = official_state_dict(n, gate, num_classes=classes)
    x = fake_images(10)
    official_forward(sd, (x - MEAN) / STD, n, gate, calibrate=True)
    centre_official_gates(sd, (x - MEAN) / STD, n, gate)
    ref_logits, ref_decisions, _ = official_forward(sd, (x - MEAN) / STD, n, gate)
    assert 0 < ref_decisions.float().mean() < 1, "the test images must mix run and skipped blocks"
    pred = ref_logits.argmax(1)
    labels = [int(p) if i < 7 else (int(p) + 1) % classes for i, p in enumerate(pred)]  # 7 of 10 right
    write_cifar(tmp_path, x, labels, cifar100)
    path = tmp_path / "checkpoint_latest.pth.tar"
    save_like_official(sd, path, get_spec(name).official.split()[-1])

    with pytest.raises(SystemExit) as exc:
        main(["eval", name, "--weights", str(path), "--data", str(tmp_path), "--latency-n", "2"])
    assert exc.value.code == 0, capsys.readouterr().err
    rows = table(capsys.readouterr().out)
    assert rows["accuracy"] == "70.00 %" and rows["images"].startswith("10 ")
    assert rows["dataset"] == ("cifar100" if cifar100 else "cifar10")

    # the decisions behind those figures are the official ones
    model = create_model(name, weights=path)
    images = load_dataset(get_spec(name).dataset, root=tmp_path).images
    with torch.no_grad(), Trace() as trace:
        model(images)
    assert torch.equal(trace.flat("decision"), ref_decisions)


def test_attack_official_victim_on_cifar10(capsys, tmp_path):
    sd = dynconv_official_state_dict(3)  # ResNet-20
    path = tmp_path / "dynconv.pth"
    torch.save({"state_dict": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "best_prec1": 90.0},
               path)  # the DynConv release saves without DataParallel
    write_cifar(tmp_path, fake_images(4), [0, 1, 2, 3])
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["attack", "--victim", "dynconv-resnet20-cifar10-official", "--weights", str(path), "--dataset", "cifar10",
              "--data", str(tmp_path), "--attack", "ilfo", "--steps", "2", "--n", "2", "--batch-size", "2",
              "--latency-n", "0", "--out", str(out), "--no-progress"])
    assert exc.value.code == 0, capsys.readouterr().err
    assert (out / "summary.json").exists()


def test_checkpoint_of_another_architecture_names_it(capsys, tmp_path):
    path = tmp_path / "skipnet110.pth.tar"
    save_like_official(official_state_dict(18, "rnn"), path, "cifar10_rnn_gate_110")
    err = one_line_error(capsys, ["eval", "skipnet38-rnn-cifar10-official", "--weights", str(path)])
    # the RL twin holds the same tensors; the CIFAR-100 ones differ in the classifier
    assert "fits skipnet110-rnn-cifar10-official or skipnet110-rnn-rl-cifar10-official (53 gates)" in err
    assert "not skipnet38-rnn-cifar10-official (17 gates)" in err and "cifar100" not in err

    save_like_official(dynconv_official_state_dict(5), path, "resnet32")  # another family
    err = one_line_error(capsys, ["eval", "skipnet38-ff-cifar10-official", "--weights", str(path)])
    assert "fits dynconv-resnet32-cifar10-official" in err

    sd = official_state_dict(6, "rnn")
    del sd["fc.bias"]  # fits nothing registered: the keys are listed
    save_like_official(sd, path, "cifar10_rnn_gate_38")
    err = one_line_error(capsys, ["eval", "skipnet38-rnn-cifar10-official", "--weights", str(path)])
    assert "missing keys [fc.bias]" in err and "fits" not in err


@pytest.mark.parametrize("gate", ["rnn", "ffgate1"])
def test_skipnet_skips_a_block_at_an_exact_tie_as_officially(tmp_path, gate):
    """The release runs a block when sigmoid(q) > 0.5 (RNN) or softmax(l)[1] > 0.5 (FF): at q == 0
    exactly it is skipped."""
    sd = official_state_dict(2, gate)
    if gate == "rnn":
        sd["control.proj.weight"], sd["control.proj.bias"] = torch.zeros(1, 10), torch.zeros(1)
    else:
        for key in [k for k in sd if k.endswith(".linear_layer.weight")]:
            sd[key] = torch.zeros_like(sd[key])
            sd[key[:-len("weight")] + "bias"] = torch.full((2,), 0.25)  # l_on == l_off
    x = fake_images(3)
    ref_logits, ref_decisions, probs = official_forward(sd, (x - MEAN) / STD, 2, gate)
    assert (probs == 0.5).all() and not ref_decisions.any()
    path = tmp_path / "tie.pth"
    save_like_official(sd, path, gate)
    net = load_weights(skipnet_cifar(14, gate=gate).eval(), path)
    with torch.no_grad(), Trace() as trace:
        logits = net(x)
        skipped = net.forward_conditional(x)
    assert (trace.flat("logit") == 0).all() and not trace.flat("decision").any()
    assert_logits_close(logits, ref_logits)
    assert_logits_close(skipped, ref_logits)


def test_dynconv_runs_a_position_at_an_exact_tie_as_officially(tmp_path):
    """DynConv's release keeps a position when q >= 0: the tie stays on (gates are not strict by default)."""
    sd = dynconv_official_state_dict(2)
    for key in [k for k in sd if ".masker.maskconv." in k]:
        sd[key] = torch.zeros_like(sd[key])
    path = tmp_path / "tie.pth"
    torch.save({"state_dict": sd}, path)
    net = load_weights(dynconv_cifar(14).eval(), path)
    with torch.no_grad(), Trace() as trace:
        net(fake_images(2))
    mask_events = trace.events[0::2]
    assert all((e.logit == 0).all() and e.decision.all() for e in mask_events)


def test_official_names_are_listed_and_need_weights(capsys):
    with pytest.raises(SystemExit):
        main(["models"])
    out = capsys.readouterr().out
    official = [m for m in list_models() if m["official"]]
    assert len(official) >= 16
    for m in official:
        line = next(row for row in out.splitlines() if row.startswith(m["name"] + " "))
        assert line.endswith("no — bring the official .pth") and f" {m['dataset']} " in line
    for name in ("skipnet38-ff-cifar10-official", "skipnet110-rnn-rl-cifar10-official",
                 "skipnet110-rnn-cifar100-official", "skipnet101-rnn-imagenet-official",
                 "dynconv-resnet32-cifar10-official"):
        assert name in out
    err = one_line_error(capsys, ["eval", "skipnet110-rnn-cifar10-official"])
    assert "--weights" in err and "cifar10_rnn_gate_110" in err
    with pytest.raises(DynattackError, match="--weights"):
        create_model("dynconv-resnet32-cifar10-official")
    err = one_line_error(capsys, ["train", "skipnet38-rnn-cifar10-official"])
    assert "--weights" in err


def test_imagenet_official_registration_without_a_forward():
    """SkipNet-101's official layout (every block's gate, blocks holding their shortcut, the
    DataParallel prefix, no normalisation buffers) fits both ImageNet names, and their reader
    evaluates as the release does (resize 256, centre crop 224). Shapes only: on the meta device."""
    with torch.device("meta"):
        ours = skipnet_imagenet(101).state_dict()
    official = {k: v for k, v in ours.items() if not k.startswith("normalize.")}
    official["group4_gate2.1.weight"] = torch.empty(10, 2048, 1, 1, device="meta")  # computed, never used
    official["group4_gate2.1.bias"] = torch.empty(10, device="meta")
    for key in [k for k in ours if k.startswith("group") and "_ds" in k.split(".")[0]]:
        block, rest = key.split(".", 1)
        official[block.replace("_ds", "_layer") + ".downsample." + rest] = ours[key]
    official = {"module." + k: v for k, v in official.items()}
    assert fitting_models(official) == ["skipnet101-rnn-imagenet-official", "skipnet101-rnn-rl-imagenet-official"]
    spec = get_spec("skipnet101-rnn-imagenet-official")
    assert spec.dataset == "folder" and spec.data_args == {"size": 256, "crop": 224}


def test_cifar100_reader_reads_fine_labels_and_says_where_it_looked(tmp_path):
    sub = tmp_path / "cifar-100-python"
    sub.mkdir()
    with pytest.raises(DynattackError) as exc:
        load_dataset("cifar-100", root=tmp_path)
    assert "CIFAR-100" in str(exc.value) and str(sub) in str(exc.value)
    x = fake_images(3)
    write_cifar(sub, x, [0, 99, 42], cifar100=True)
    data = load_dataset("cifar100", root=tmp_path)
    assert torch.equal(data.images, x) and data.labels.tolist() == [0, 99, 42]
    assert data.classes[0] == "apple" and data.classes[99] == "worm" and len(data.classes) == 100
    write_cifar(sub, x, [0, 100, 42], cifar100=True)  # fine labels lie in 0..99
    with pytest.raises(DynattackError, match="label 100"):
        load_dataset("cifar100", root=tmp_path)
