"""Config loading: typed, validated once, one-line errors; overrides; device choice; run folder names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import run
from engines.experiment import resolve_device
from mqvae.config import config_from_dict, load_config, read_yaml
from mqvae.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
LEVEL = [{"name": "vqvae", "problem": "VQVAE"}]


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if "sweep" in read_yaml(path):
            continue
        cfg = load_config(path)
        assert cfg.levels


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
