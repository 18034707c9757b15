"""The classification task end to end: ResNet-18 halves around the quantizer, three training modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

import problems  # noqa: F401  (registers the level kinds the configs name)
import run
from mqvae.config import load_config
from mqvae.evaluation.metrics import macro_f1
from mqvae.method.models import build_model
from mqvae.nn.resnet import resnet18_halves

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def few_digits(monkeypatch):
    """The real digits loader, with the test split cut to 24 images: a full-width ResNet-18 evaluation
    (plus Δgap's two decoder passes) over all 297 would dominate the test's time on a loaded CPU."""
    from torch.utils.data import TensorDataset

    from mqvae import data

    original = data.DATASETS["digits"]

    def fewer(root, download, seed):
        sets = original(root, download, seed)
        sets.test = TensorDataset(*(t[:24] for t in sets.test.tensors))
        return sets

    monkeypatch.setitem(data.DATASETS, "digits", fewer)


FAST = ["--set", "train.iters=2", "--set", "train.log_every=1", "--set", "train.eval_every=0",
        "--set", "train.checkpoint_every=0", "--set", "data.batch_size=8", "--set", "device=cpu",
        "--set", "quantizer.num_codes=16", "--set", "quantizer.dim=8"]


def test_resnet18_halves_shapes():
    encoder, decoder = resnet18_halves(1, 10, dim=8)
    z = encoder(torch.rand(2, 1, 16, 16))
    assert z.shape == (2, 8, 8, 8)  # 3x3 stride-1 stem, layer2 halves the side
    assert decoder(z).shape == (2, 10)
    encoder, decoder = resnet18_halves(3, 100, dim=4)
    z = encoder(torch.rand(2, 3, 32, 32))
    assert z.shape == (2, 4, 16, 16) and decoder(z).shape == (2, 100)


@pytest.mark.parametrize("config, loss", [("vqvae", "mse"), ("classify_vqvae", "cross_entropy")])
def test_the_model_kind_decides_the_task_loss(config, loss):
    cfg = load_config(ROOT / f"configs/digits/{config}.yaml", ["quantizer.num_codes=16", "quantizer.dim=8"])
    model = build_model(cfg, 1, 10, 16).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 1, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
    with torch.no_grad():
        output = model(x).output
        expected = F.mse_loss(output, x) if loss == "mse" else F.cross_entropy(output, y)
        assert torch.equal(model.task_loss(output, (x, y)), expected)


@pytest.mark.parametrize("name", ["classify_vqvae", "classify_alt", "classify_mqvae"])
def test_classification_config_trains_end_to_end(tmp_path, name):
    out = tmp_path / name
    assert run.main([f"configs/digits/{name}.yaml", *FAST, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "f1", "cross_entropy", "perplexity", "gradient_gap"):
        assert key in metrics and metrics[key] is not None, key
    assert 0 <= metrics["accuracy"] <= 1 and metrics["cross_entropy"] > 0 and metrics["gradient_gap"] >= 0
    assert metrics["iterations"] == 2
    for file in ("recon.png", "codebook.png", "report.md", "curves.png"):
        assert (out / file).is_file()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    if name != "classify_vqvae":
        assert set(state["levels"]) == {"codebook", "autoencoder"}


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 7, (200,), generator=g)
    predictions = torch.where(torch.rand(200, generator=g) < 0.6, labels, torch.randint(0, 9, (200,), generator=g))
    expected = f1_score(labels.numpy(), predictions.numpy(), average="macro")
    assert macro_f1(predictions, labels) == pytest.approx(expected, abs=1e-12)
