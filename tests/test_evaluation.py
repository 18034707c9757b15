"""evaluate(): Δgap and perplexity against independent computations; FID/IS/LPIPS null with a reason or
finite with stand-in networks, through the run's own final evaluation, LPIPS at the data set's own size."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fake_datasets
import run
from mqvae.evaluation import evaluate as evaluation
from mqvae.evaluation import metrics as metric_fns
from mqvae.evaluation.metrics import ImageQuality, SCALES
from mqvae.method.models import build_model
from mqvae.nn.networks import QuantizedNetwork
from mqvae.method.tasks import CLASSIFICATION, RECONSTRUCTION

from helpers import measured, tiny_config

TINY = ["--set", "model.hidden_channels=8", "--set", "model.res_channels=4", "--set", "model.num_res_blocks=1",
        "--set", "train.log_every=1", "--set", "device=cpu", "--set", "train.iters=2"]


def tiny_model(task=RECONSTRUCTION):
    torch.manual_seed(0)
    cfg = tiny_config(levels=[{"name": "vqvae", "problem": "VQVAE"}])
    model = build_model(cfg, 1, 10, 16)
    if task is CLASSIFICATION:  # a small head on the decoder output, so the same tiny model classifies
        return QuantizedNetwork(model.encoder, model.quantizer,
                                nn.Sequential(model.decoder, nn.Flatten(), nn.Linear(16 * 16, 10)), CLASSIFICATION)
    return model


def data(n=37):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("task", [RECONSTRUCTION, CLASSIFICATION], ids=lambda task: task.name)
def test_gradient_gap_equals_two_explicit_passes(task):
    model, dataset = tiny_model(task), data()
    metrics, _ = evaluation.evaluate(model, dataset, 8, "cpu")
    model.eval()
    gaps = []
    for x, y in DataLoader(dataset, batch_size=8):
        # independent: the continuous model (decoder on z_e) and the quantized one (decoder on the chosen codes)
        z_e = model.encoder(x).detach().double().requires_grad_(True)
        decoder = model.decoder.double()
        codes = model.quantizer.effective_codebook().detach().double()
        flat = z_e.detach().movedim(1, -1).reshape(-1, z_e.shape[1])
        nearest = torch.cdist(flat, codes).argmin(1)
        z_q = codes[nearest].reshape(z_e.shape[0], z_e.shape[2], z_e.shape[3], -1).movedim(-1, 1)
        z_q = z_q.clone().requires_grad_(True)

        def loss(out):
            return F.mse_loss(out, x.double()) if task is RECONSTRUCTION else F.cross_entropy(out, y)

        (g_cont,) = torch.autograd.grad(loss(decoder(z_e)), z_e)
        (g_quant,) = torch.autograd.grad(loss(decoder(z_q)), z_q)
        gaps.append(float((g_cont - g_quant).pow(2).sum().sqrt()))
        model.float()
    assert len(gaps) == 5
    assert metrics["gradient_gap"] == pytest.approx(sum(gaps) / len(gaps), rel=1e-4)
    assert metrics["gradient_gap"] > 0


# metrics.code_rate's keys (tests/test_metrics.py checks their values).
RATE = {"rate_bits", "entropy_bits", "perplexity_per_group", "active_codes_per_group"}


@pytest.mark.parametrize("task", [RECONSTRUCTION, CLASSIFICATION], ids=lambda task: task.name)
def test_task_metrics_equal_an_independent_pass_and_training_mode_comes_back(task):
    from sklearn.metrics import f1_score

    model, dataset = tiny_model(task), data()
    model.train()
    metrics, _ = evaluation.evaluate(model, dataset, 8, "cpu")
    assert model.training
    model.eval()
    with torch.no_grad():
        outputs = torch.cat([model(x).output for x, _ in DataLoader(dataset, batch_size=8)]).double()
    x, y = dataset.tensors
    if task is RECONSTRUCTION:
        assert set(metrics) == {"perplexity", "active_codes", "gradient_gap", "test_mse", *RATE}
        assert metrics["test_mse"] == pytest.approx(float(((outputs - x.double()) ** 2).mean()), rel=1e-6)
    else:
        assert set(metrics) == {"perplexity", "active_codes", "gradient_gap", "accuracy", "f1", "cross_entropy", *RATE}
        predicted = outputs.argmax(1)
        assert metrics["accuracy"] == pytest.approx(float((predicted == y).double().mean()), rel=1e-6)  # a float32 mean
        assert metrics["f1"] == pytest.approx(f1_score(y.numpy(), predicted.numpy(), average="macro"), abs=1e-12)
        assert metrics["cross_entropy"] == pytest.approx(float(F.cross_entropy(outputs, y)), rel=1e-6)


def test_evaluating_gives_back_the_mode_it_found_even_after_an_error():
    model = nn.BatchNorm1d(2)
    with pytest.raises(ZeroDivisionError):
        with evaluation.evaluating(model):
            assert not model.training
            1 / 0
    assert model.training
    model.eval()
    with evaluation.evaluating(model):
        assert not model.training
    assert not model.training


def test_test_set_perplexity_is_float64_entropy_of_counts():
    model, dataset = tiny_model(), data()
    metrics, counts = evaluation.evaluate(model, dataset, 8, "cpu")
    model.eval()
    with torch.no_grad():
        indices = torch.cat([model.quantizer(model.encoder(x)).indices.reshape(-1) for x, _ in DataLoader(dataset, batch_size=8)])
    expected_counts = [int((indices == k).sum()) for k in range(model.quantizer.num_codes)]
    assert counts.tolist() == expected_counts
    total = sum(expected_counts)
    entropy = -sum(c / total * math.log2(c / total) for c in expected_counts if c)
    assert metrics["perplexity"] == pytest.approx(2.0 ** entropy, rel=1e-12)
    assert metrics["active_codes"] == sum(1 for c in expected_counts if c)


def test_image_quality_null_with_reason_in_the_runs_metrics(tmp_path, monkeypatch):
    # "Weights absent" regardless of the machine: an empty torch hub cache, and a stand-in Inception URL so that
    # the reason is the cache's with or without torch-fidelity installed.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(metric_fns, "inception_url", lambda: "https://example.invalid/inception.pth")
    out = tmp_path / "run"
    assert run.main(["configs/digits/vqvae.yaml", *TINY, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "inception.pth"
    for name in ("fid", "is"):
        assert metrics[name] is None
        assert f"weights not in the local cache ({cached}); set eval.download_weights: true" in metrics[f"{name}_reason"]
    # 16-px digits: LPIPS would be undefined even with the weights, and that is the reason given.
    assert metrics["lpips"] is None and "cannot take 16x16 images" in metrics["lpips_reason"]
    assert metrics["scales"] == SCALES
    assert "gradient_gap" in metrics and math.isfinite(metrics["gradient_gap"])
    report = (out / "report.md").read_text()
    assert f"n/a (FID Inception weights not in the local cache ({cached})" in report


class AlexShapedFeatures(nn.Module):
    """Five feature maps with AlexNet's channel counts (what LPIPS's learned heads expect); remembers the
    spatial size of every batch it is shown."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, stride=2 if i < 2 else 1, padding=1)
                                   for i, (c_in, c_out) in enumerate([(3, 64), (64, 192), (192, 384), (384, 256), (256, 256)]))
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        outs = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            outs.append(x)
        return outs


class Pooled(nn.Module):
    def __init__(self, out_features):
        super().__init__()
        torch.manual_seed(1)
        self.linear = nn.Linear(3 * 4 * 4, out_features)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(x.float(), 4).flatten(1))


def _run_with_stand_ins(tmp_path, monkeypatch, *args) -> tuple[dict, AlexShapedFeatures]:
    backbone = AlexShapedFeatures()
    monkeypatch.setattr(evaluation, "make_image_quality", lambda device, download_weights: ImageQuality(
        device, fid_feature=Pooled(8), is_feature=Pooled(10), lpips_net=backbone))
    out = tmp_path / "run"
    assert run.main(["configs/digits/vqvae.yaml", *TINY, *args, "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text()), backbone


def test_image_quality_finite_with_stand_in_networks_through_the_run(tmp_path, monkeypatch):
    metrics, backbone = _run_with_stand_ins(tmp_path, monkeypatch)
    for name in ("fid", "is"):
        assert metrics[name] is not None and math.isfinite(metrics[name]), name
        assert metrics[f"{name}_reason"] is None
    assert metrics["is"] >= 1.0 - 1e-6
    # The digits are 16 px, under AlexNet's minimum: LPIPS is null, not measured on resized images.
    assert metrics["lpips"] is None and "cannot take 16x16 images" in metrics["lpips_reason"]
    assert backbone.sizes == []


# MNIST's native 28 px is under AlexNet's minimum (31), CIFAR-10's 32 px is not.
@pytest.mark.parametrize("name, side, measured", [("mnist", 28, False), ("cifar10", 32, True)])
def test_lpips_at_the_data_sets_own_size_through_the_run(tmp_path, monkeypatch, name, side, measured):
    fake_datasets.skip_md5_checks(monkeypatch)
    if name == "mnist":
        fake_datasets.write_mnist(tmp_path / "data", 8, 6)
    else:
        fake_datasets.write_cifar10(tmp_path / "data", 2)
    metrics, backbone = _run_with_stand_ins(tmp_path, monkeypatch, "--set", f"data.name={name}",
                                            "--set", f"data.root={tmp_path / 'data'}", "--set", "data.batch_size=4")
    assert metrics["fid"] is not None and math.isfinite(metrics["fid"])
    if measured:  # at the images' own size, as torchmetrics computes it, never upsampled
        assert metrics["lpips_reason"] is None and math.isfinite(metrics["lpips"])
        assert backbone.sizes and set(backbone.sizes) == {(side, side)}
    else:  # null with the reason, not measured on resized images
        assert metrics["lpips"] is None and f"cannot take {side}x{side} images" in metrics["lpips_reason"]
        assert backbone.sizes == []


# -- the test images a picture shows ------------------------------------------------------------------

def test_the_shown_images_take_the_classes_in_turn_where_the_first_would_all_be_one_class():
    labels = torch.arange(4).repeat_interleave(10)  # an image folder's test split: class folder by class folder
    dataset = TensorDataset(torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(2)), labels)
    assert evaluation.shown_indices(dataset, 6) == [0, 10, 20, 30, 1, 11]
    assert sorted(evaluation.shown_indices(dataset, 100)) == list(range(40))  # all of them, each once
    # recon.png's and the classification picture's images are those items.
    x, _ = evaluation.reconstructions(tiny_model(), dataset, 6, "cpu")
    assert torch.equal(x, dataset.tensors[0][[0, 10, 20, 30, 1, 11]])
    _, _, true = evaluation.predictions(tiny_model(CLASSIFICATION), dataset, 6, "cpu")
    assert true.tolist() == [0, 1, 2, 3, 0, 1]


def test_the_shown_images_are_evenly_spaced_without_two_classes():
    images = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    for dataset in (TensorDataset(images), TensorDataset(images, torch.zeros(10, dtype=torch.long))):
        assert evaluation.shown_indices(dataset, 4) == [0, 2, 5, 7]


@pytest.mark.parametrize("config", ["gumbel", "replace"])
def test_how_often_a_run_evaluates_leaves_its_training_unchanged(tmp_path, config):
    # Gumbel noise and LRU replacement draw from torch's global generator; an evaluation must not advance it.
    common = [f"configs/digits/{config}.yaml", *TINY, "--set", "train.iters=6", "--set", "train.checkpoint_every=0",
              "--set", "eval.image_quality=off", "--set", "threads=1"]
    if config == "replace":
        common += ["--set", "quantizer.replace_freq=2", "--set", "quantizer.kmeans_init=false"]  # dead codes to replace
    for every in (0, 1):
        assert run.main([*common, "--set", f"train.eval_every={every}", "--out", str(tmp_path / str(every))]) == 0
    training = [[r for r in measured(tmp_path / str(every)) if "test_mse" not in r] for every in (0, 1)]
    assert len(training[0]) == 6 and training[0] == training[1]
    metrics = [json.loads((tmp_path / str(every) / "metrics.json").read_text()) for every in (0, 1)]
    assert metrics[0]["test_mse"] == metrics[1]["test_mse"]
