"""Config loading: typed, validated once, one-line errors; overrides; device choice; run folder names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import run
from engines.experiment import resolve_device
from mqvae.config import config_from_dict, load_config, read_yaml
from mqvae.errors import UserError
from mqvae.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
LEVEL = [{"name": "vqvae", "problem": "VQVAE"}]


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if "sweep" in read_yaml(path):
            continue
        cfg = load_config(path)
        assert cfg.levels


def shipped_experiments():
    """Every experiment the repository ships: each config file, and each run of each sweep file, with the
    overrides a sweep row applies itself."""
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if "sweep" not in read_yaml(path):
            yield str(path.relative_to(ROOT)), load_config(path), []
            continue
        sweep = load_sweep(path)
        for run in sweep.runs:
            yield f"{path.relative_to(ROOT)}: {run.label}", load_config(ROOT / run.config, sweep.set + run.set), run.set


def test_shipped_experiments_use_kmeans_init_and_alternated_ones_beta_zero():
    # MQ-VAE §5.1: "All models were initialized using the K-means clustering algorithm" (Gumbel-VQ picks codes
    # from logits, so k-means has nothing to fit there). §4.4: alternated optimization is xi = 0 with beta = 0.
    experiments = list(shipped_experiments())
    assert len(experiments) > 30
    for name, cfg, overrides in experiments:
        assert cfg.quantizer.kmeans_init == (cfg.quantizer.kind != "gumbel"), name
        # (a sweep row that sets quantizer.beta itself is a labelled variant, e.g. "+ alt (beta 0.25)")
        if cfg.hypergradient.xi == 0 and not any(o.startswith("quantizer.beta=") for o in overrides):
            assert cfg.quantizer.beta == 0, name
    assert sum(cfg.hypergradient.xi == 0 for _, cfg, _ in experiments) >= 3


@pytest.mark.parametrize("data, needles", [
    ({"quantizer": {"num_cods": 3}}, ["quantizer.num_cods", "did you mean 'num_codes'"]),
    ({"levels": [{"name": "a", "problem": "VQVAE", "lr": -1}]}, ["levels.0.lr", "greater than 0"]),
    ({"device": "tpu"}, ["device", "auto, cpu, cuda"]),
    ({"train": {"iters": 1.5}}, ["train.iters", "integer"]),
    ({"hypergradient": {"xi": 0.0, "roll_back": True}}, ["roll_back", "xi > 0"]),
    ({"levels": [{"name": "a", "problem": "VQVAE", "lower": ["b"]}]}, ["levels.0.lower", "'b'"]),
])
def test_errors_are_one_line_and_name_the_key(data, needles):
    with pytest.raises(UserError) as info:
        config_from_dict({"levels": LEVEL, **data}, "x.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("x.yaml: ")
    for needle in needles:
        assert needle in message


def test_overrides_reach_any_key_and_levels_by_name():
    cfg = load_config(ROOT / "configs/digits/mqvae.yaml",
                      ["train.iters=7", "levels.codebook.lr=0.5", "levels.1.optimizer=sgd", "hypergradient.xi=0.01"])
    assert cfg.train.iters == 7 and cfg.level("codebook").lr == 0.5
    assert cfg.level("autoencoder").optimizer == "sgd" and cfg.hypergradient.xi == 0.01
    with pytest.raises(UserError, match="unknown key"):
        load_config(ROOT / "configs/digits/mqvae.yaml", ["train.iterz=7"])


def test_device_auto_picks_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda")


def test_default_run_folder_follows_the_config_name():
    assert run.default_run_dir(Path("configs/digits/mqvae.yaml")) == Path("runs/digits/mqvae")
    assert run.default_run_dir(Path("/elsewhere/my_exp.yaml")) == Path("runs/my_exp")
