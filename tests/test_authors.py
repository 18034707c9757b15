"""MQ-VAE as its authors' code runs it: Betty's darts (post-step centre, no xi) with gradient accumulation 4 on both
levels, an SGD-momentum codebook and AdamW (0.5, 0.9) below it; its Fig. 6 quantities; and a run killed inside an
accumulation window. References are plain torch in float64."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from engines.build import level_steps
from helpers import (PLAIN, assert_same_checkpoints, float64, killed_and_resumed, tiny_config,  # noqa: F401
                     tiny_engine)  # (float64: a fixture)
from test_run import TINY

GAS = 4
LOWER_LR, CODEBOOK_LR, ALPHA = 1e-2, 5e-2, 0.01


def authors_levels(gas=GAS):
    return [
        {"name": "codebook", "problem": "Codebook", "optimizer": "sgd", "lr": CODEBOOK_LR, "momentum": 0.9,
         "grad_accumulation": gas, **PLAIN, "lower": ["autoencoder"]},
        {"name": "autoencoder", "problem": "AutoEncoder", "optimizer": "adamw", "lr": LOWER_LR, "betas": [0.5, 0.9],
         "eps": 1e-7, "grad_accumulation": gas, **PLAIN},
    ]


def authors_engine(tmp_path, **kwargs):
    return tiny_engine(tmp_path, levels=authors_levels(), hypergradient={"type": "darts", "alpha": ALPHA},
                       data={"name": "digits64", "batch_size": 16}, **kwargs)


def lower_parameters(model):
    return list(model.encoder.parameters()) + list(model.decoder.parameters())


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def authors_loop(model, batches, gas=GAS):
    """The authors' training loop written out: every iteration the encoder-decoder accumulates the gradient of
    L / gas and steps every gas iterations; after each of its steps the codebook takes the direct term at the
    post-step parameters plus Betty's darts term, (grad_C L(w' - eps v) - grad_C L(w' + eps v)) / (2 eps) with
    eps = alpha / ||v|| and no xi, and steps on every gas-th of them. Returns the last (direct, implicit)."""
    lower, codebook = lower_parameters(model), [model.quantizer.codebook]
    opt_lower = torch.optim.AdamW(lower, lr=LOWER_LR, betas=(0.5, 0.9), eps=1e-7, weight_decay=0.0)
    opt_codebook = torch.optim.SGD(codebook, lr=CODEBOOK_LR, momentum=0.9)

    def loss(batch):
        return model.loss(batch)["loss"]

    terms, upper_steps = None, 0
    for t, batch in enumerate(batches, start=1):
        for p, g in zip(lower, torch.autograd.grad(loss(batch) / gas, lower)):
            p.grad = g if p.grad is None else p.grad + g
        if t % gas:
            continue
        opt_lower.step()
        opt_lower.zero_grad()
        grads = torch.autograd.grad(loss(batch) / gas, codebook + lower)
        direct, v = grads[0], grads[1:]
        eps = ALPHA / flat(v).norm()
        post = [p.detach().clone() for p in lower]
        at = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, p1, vi in zip(lower, post, v):
                    p.copy_(p1 + sign * eps * vi)
            at.append(torch.autograd.grad(loss(batch), codebook)[0])
        with torch.no_grad():
            for p, p1 in zip(lower, post):
                p.copy_(p1)
        implicit = (at[1] - at[0]) / (2 * eps)
        codebook[0].grad = direct + implicit if codebook[0].grad is None else codebook[0].grad + direct + implicit
        terms = (direct, implicit)
        upper_steps += 1
        if upper_steps % gas == 0:
            opt_codebook.step()
            opt_codebook.zero_grad()
    return terms


def test_darts_with_accumulation_equals_the_authors_loop(tmp_path, float64):
    engine = authors_engine(tmp_path)
    reference = copy.deepcopy(engine.model)
    start = engine.model.quantizer.codebook.detach().clone()
    batches = []
    for t in range(1, 4 * GAS + 1):
        engine.global_step = t
        engine.train_step()
        batches.append(engine.autoencoder.cur_batch)
        # The codebook's optimizer steps on the 4th of its hypergradients, taken every 4th iteration.
        assert torch.equal(engine.model.quantizer.codebook, start) == (t < 4 * GAS), t
    direct, implicit = authors_loop(reference, batches)
    for (name, got), (_, want) in zip(engine.model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10, msg=lambda m: f"{name}: {m}")
    # Fig. 6 of the last hypergradient, against the terms the reference used.
    stats = engine.codebook.hypergradient_stats()
    d, i = direct.reshape(-1), implicit.reshape(-1)
    assert i.norm() > 0.1 * d.norm()  # darts' term is of the direct term's size (Eq. 13's is ~xi times smaller)
    want = {"direct_norm": d.norm(), "implicit_norm": i.norm(), "cosine": d @ i / (d.norm() * i.norm()),
            "implicit_ratio": i.norm() / d.norm()}
    for key, value in want.items():
        torch.testing.assert_close(stats[key], value, rtol=1e-7, atol=1e-12, msg=lambda m: f"{key}: {m}")


def test_each_levels_schedule_spans_the_steps_it_takes():
    # The codebook steps once per window of the level below it: its warm-up and cosine cover train.iters / 4 steps.
    cfg = tiny_config(levels=authors_levels(), hypergradient={"type": "darts"}, train={"iters": 100})
    assert level_steps(cfg, {"autoencoder": ["codebook"]}) == {"codebook": 25, "autoencoder": 100}
    chain = [{**level, "grad_accumulation": gas} for level, gas in zip(authors_levels(), (2, 5))]
    cfg = tiny_config(levels=chain, train={"iters": 100})
    assert level_steps(cfg, {"autoencoder": ["codebook"]}) == {"codebook": 20, "autoencoder": 100}


def records(folder):
    lines = (folder / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]


@pytest.mark.long("three processes train the authors' preset 12 iterations each (a killed run, its resume, the reference)")
def test_a_run_killed_inside_an_accumulation_window_resumes_exactly(tmp_path):
    # The checkpoint at iteration 6 lies inside the encoder-decoder's second window (iterations 5-8) and the
    # codebook's first (its optimizer steps at 16): the accumulated gradients must come back.
    args = ["configs/digits/mqvae_authors.yaml", *TINY, "--set", "train.iters=12", "--set", "train.checkpoint_every=6",
            "--set", "train.eval_every=0", "--set", "levels.codebook.grad_accumulation=2"]
    killed, reference = killed_and_resumed(args, tmp_path)
    assert records(killed) == records(reference)
    assert any("codebook.implicit_ratio" in r for r in records(killed))
    assert_same_checkpoints(killed, reference)
