"""Same seed, same start: every method at a seed begins from the same encoder, decoder and codebook and trains
on the same batches, so a comparison at one seed is paired."""

from __future__ import annotations

from pathlib import Path

import torch

from engines.experiment import build_engine, initialize_codebook
from mqvae.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_channels=8", "model.res_channels=4", "model.num_res_blocks=1", "device=cpu", "seed=7"]
STEPS = 4


def start(tmp_path, name, *extra):
    cfg = load_config(ROOT / f"configs/digits/{name}.yaml", TINY + list(extra))
    engine = build_engine(cfg, tmp_path / name)
    initialize_codebook(engine)
    weights = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    batches = []
    for _ in range(STEPS):
        engine.train_step()
        batches.append(engine.encoder_level.cur_batch)
    # The rest of this epoch and the next one, which each stream reshuffles, from the stream of the training split.
    (stream,) = [p.stream for p in engine.problems if p.stream is not None and p.stream.dataset is engine.datasets.train]
    for _ in range(2):
        batches += list(stream)
    return weights, batches


def test_vqvae_alt_and_mqvae_start_alike_at_one_seed(tmp_path):
    weights, batches = start(tmp_path, "vqvae")
    assert weights["quantizer.codebook"].abs().sum() > 0
    for name, extra in [("mqvae", ()), ("alt", ()), ("mqvae", ("hypergradient.roll_back=true",)),
                        ("three_levels", ())]:
        other_weights, other_batches = start(tmp_path / name, name, *extra)
        assert other_weights.keys() == weights.keys(), name
        for key in weights:
            assert torch.equal(other_weights[key], weights[key]), f"{name}: {key}"
        assert len(other_batches) == len(batches)
        for i, (got, want) in enumerate(zip(other_batches, batches)):
            assert all(torch.equal(a, b) for a, b in zip(got, want)), f"{name}: batch {i}"


def test_another_seed_is_another_start(tmp_path):
    weights, batches = start(tmp_path, "vqvae")
    other_weights, other_batches = start(tmp_path / "other", "vqvae", "seed=8")
    assert not torch.equal(other_weights["quantizer.codebook"], weights["quantizer.codebook"])
    assert not torch.equal(other_batches[0][0], batches[0][0])
