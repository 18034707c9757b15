"""Optimizer and schedule settings of a level (levels.*.betas, eps, min_lr) against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import tiny_config, tiny_engine, two_levels
from mqvae.errors import UserError


def _levels(**settings):
    levels = two_levels(optimizer="adamw")
    levels[1].update(settings)
    return levels


def test_betas_and_eps_reach_the_optimizer_after_bettys_rebuild(tmp_path):
    engine = tiny_engine(tmp_path, levels=_levels(betas=[0.5, 0.9], eps=1e-7))
    group = engine.autoencoder.optimizer.param_groups[0]
    assert group["betas"] == (0.5, 0.9) and group["eps"] == 1e-7
    assert engine.codebook.optimizer.param_groups[0]["betas"] == (0.9, 0.999)  # unset: torch's defaults


def test_an_adam_step_uses_the_configured_betas_and_eps(tmp_path):
    # One AdamW step by its formula at step 1: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps); with
    # eps = 0.1 the eps term is visible. Weight decay is 0 in the tiny config.
    engine = tiny_engine(tmp_path, levels=_levels(betas=[0.5, 0.9], eps=0.1), hypergradient={"xi": 0.0})
    ae = engine.autoencoder
    before = [p.detach().clone() for p in ae.trainable_parameters()]
    grads = []
    ae.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.extend(
        p.grad.detach().clone() for group in opt.param_groups for p in group["params"]))
    engine.train_step()
    lr = ae.optimizer.param_groups[0]["lr"]
    for p, p0, g in zip(ae.trainable_parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - lr * g / (g.abs() + 0.1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scheduler, warmup", [("cosine", 0), ("warmup_cosine", 3)])
def test_cosine_schedules_anneal_to_min_lr(tmp_path, scheduler, warmup):
    iters, lr, min_lr = 10, 0.05, 0.01
    levels = _levels(scheduler=scheduler, warmup_ratio=0.3, min_lr=min_lr, lr=lr)
    ae = tiny_engine(tmp_path, levels=levels, train={"iters": iters, "log_every": 1}).autoencoder
    seen = []
    for _ in range(iters):
        seen.append(ae.optimizer.param_groups[0]["lr"])
        ae.optimizer.step()
        ae.scheduler.step()
    want = []
    for step in range(iters):
        if step < warmup:
            want.append(lr * (step + 1) / warmup)
        else:
            progress = (step - warmup) / (iters - warmup)
            want.append(min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert seen == pytest.approx(want, rel=1e-12)
    assert min(seen[warmup:]) > min_lr


@pytest.mark.parametrize("settings, needle", [
    ({"optimizer": "sgd", "betas": [0.5, 0.9]}, "betas and eps are Adam's settings"),
    ({"optimizer": "sgd", "eps": 1e-7}, "betas and eps are Adam's settings"),
    ({"betas": [0.5]}, "betas: expected two numbers in [0, 1)"),
    ({"betas": [0.5, 1.0]}, "betas: expected two numbers in [0, 1)"),
    ({"min_lr": 1e-4}, "min_lr: the floor of the cosine and warmup_cosine schedules"),
    ({"scheduler": "cosine", "min_lr": 1.0}, "is above the level's lr"),
])
def test_settings_the_optimizer_or_schedule_would_ignore_are_one_line(settings, needle):
    with pytest.raises(UserError) as error:
        tiny_config(levels=_levels(**settings))
    assert "\n" not in str(error.value) and "levels.autoencoder" in str(error.value) and needle in str(error.value)
