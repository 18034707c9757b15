"""Gumbel-VQ's temperature schedule (quantizer.gumbel_temperature_final): tau falls geometrically from
gumbel_temperature at step 0 to gumbel_temperature_final at the last training iteration; null keeps it constant.
Checked against the formula in float64, in the quantizer's relaxed sample, in the iterations of a run, and
across a kill and resume (tau is not saved: it is a function of the step); and the training sample, relaxed
or straight-through, against autograd through Jang et al.'s formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import run
from helpers import assert_same_checkpoints, killed_and_resumed, measured
from mqvae.config import QuantizerConfig
from mqvae.method.models import build_quantizer
from mqvae.nn.quantizers import GumbelQuantizer

SMALL = ["configs/digits/gumbel.yaml", "--set", "model.hidden_channels=8", "--set", "model.res_channels=4",
         "--set", "model.num_res_blocks=1", "--set", "quantizer.num_codes=16", "--set", "train.log_every=1",
         "--set", "train.eval_every=0", "--set", "eval.image_quality=off", "--set", "device=cpu", "--set", "threads=1"]


def reference(step: int, span: int, start: float, final: float) -> float:
    """tau by the exponential's formula: start at step 0, final from step ``span`` on."""
    return math.exp(math.log(start) + (min(step, span) / span) * (math.log(final) - math.log(start)))


@pytest.mark.parametrize("start, final, anneal", [(1.0, 0.5, None), (2.0, 0.5, None), (0.7, 1.3, None),
                                                  (1.0, 0.5, 10), (1.0, 0.25, 37)])
def test_the_temperature_is_geometric_from_start_to_final(start, final, anneal):
    q = build_quantizer(QuantizerConfig(kind="gumbel", kmeans_init=False, gumbel_temperature=start,
                                        gumbel_temperature_final=final, gumbel_anneal_iters=anneal))
    iters = 37
    span = anneal or iters
    for step in (0, 1, 5, 9, 10, 11, 18, 36, 37):
        assert q.temperature_at(step, iters) == pytest.approx(reference(step, span, start, final), rel=1e-12)
    assert q.temperature_at(0, iters) == pytest.approx(start, rel=1e-12)
    assert q.temperature_at(span, iters) == pytest.approx(final, rel=1e-12)
    assert q.temperature_at(iters, iters) == pytest.approx(final, rel=1e-12)


def test_without_a_final_temperature_it_stays_constant():
    q = build_quantizer(QuantizerConfig(kind="gumbel", kmeans_init=False, gumbel_temperature=0.8))
    for step in (1, 50, 100):
        q.begin_iteration(step, 100)
        assert q.temperature.item() == pytest.approx(0.8)


def test_the_relaxed_sample_uses_the_iterations_temperature():
    cfg = QuantizerConfig(kind="gumbel", num_codes=8, dim=4, kmeans_init=False, gumbel_temperature=1.0,
                          gumbel_temperature_final=0.25)
    q = build_quantizer(cfg).double().train()
    assert isinstance(q, GumbelQuantizer)
    z_e = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    logits = q.proj(z_e.movedim(1, -1).reshape(-1, 4)).detach()
    q.begin_iteration(30, 40)
    tau = reference(30, 40, 1.0, 0.25)
    torch.manual_seed(11)
    got = q(z_e).z_q.detach()
    torch.manual_seed(11)
    # The relaxed sample by hand: softmax((logits + g) / tau) with g = -log(Exp(1)), as torch draws it.
    g = -torch.empty_like(logits).exponential_().log()
    want = F.softmax((logits + g) / tau, dim=-1) @ q.codebook.detach()
    torch.testing.assert_close(got.movedim(1, -1).reshape(-1, 4), want, rtol=1e-10, atol=1e-12)


def test_a_run_samples_at_each_iterations_temperature(tmp_path, monkeypatch):
    seen = []
    forward = GumbelQuantizer.forward

    def recording(self, z_e):
        if self.training:
            seen.append(self.temperature.item())
        return forward(self, z_e)

    monkeypatch.setattr(GumbelQuantizer, "forward", recording)
    iters = 5
    args = [*SMALL, "--set", f"train.iters={iters}", "--set", "quantizer.gumbel_temperature=1.0",
            "--set", "quantizer.gumbel_temperature_final=0.5", "--set", "quantizer.gumbel_anneal_iters=3",
            "--set", "train.checkpoint_every=0"]
    assert run.main([*args, "--out", str(tmp_path / "run")]) == 0
    # One training forward per iteration (plain VQ-VAE, one level): iteration t samples at tau(t).
    assert seen == pytest.approx([reference(t, 3, 1.0, 0.5) for t in range(1, iters + 1)], rel=1e-6)


def test_an_annealed_run_resumes_exactly(tmp_path):
    args = [*SMALL, "--set", "train.iters=6", "--set", "train.checkpoint_every=3",
            "--set", "quantizer.gumbel_temperature_final=0.25"]
    killed, reference_run = killed_and_resumed(args, tmp_path)
    assert measured(killed) == measured(reference_run)
    assert_same_checkpoints(killed, reference_run)


@pytest.mark.parametrize("straight_through", [False, True])
def test_the_training_sample_and_its_gradient_match_jang_et_al(straight_through):
    """Relaxed: z_q = y @ C. Straight-through (taming-transformers' GumbelQuantize, hard=True): the forward value
    is the sampled code's row of C, and the gradient is that of (one_hot - y.detach() + y) @ C, by autograd in
    float64 with the same Gumbel noise."""
    cfg = QuantizerConfig(kind="gumbel", num_codes=8, dim=4, kmeans_init=False, gumbel_temperature=0.7,
                          gumbel_straight_through=straight_through)
    q = build_quantizer(cfg).double().train()
    q.begin_iteration(3, 10)  # tau refilled in float64 (the float32 buffer holds 0.7 rounded)
    z_e = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    torch.manual_seed(5)
    out = q(z_e)
    got = torch.autograd.grad((out.z_q * upstream).sum(), [z_e, q.codebook, q.proj.weight, q.proj.bias])

    torch.manual_seed(5)
    x = z_e.detach().clone().requires_grad_(True)
    codebook, weight, bias = (p.detach().clone().requires_grad_(True) for p in (q.codebook, q.proj.weight, q.proj.bias))
    logits = x.movedim(1, -1).reshape(-1, 4) @ weight.T + bias
    g = -torch.empty_like(logits).exponential_().log()
    y = F.softmax((logits + g) / 0.7, dim=-1)
    if straight_through:
        one_hot = F.one_hot(y.argmax(-1), 8).to(y.dtype)
        y = one_hot - y.detach() + y
    z_q = (y @ codebook).reshape(3, 2, 2, 4).movedim(-1, 1)
    want = torch.autograd.grad((z_q * upstream).sum(), [x, codebook, weight, bias])

    torch.testing.assert_close(out.z_q.detach(), z_q.detach(), rtol=1e-12, atol=1e-12)
    assert out.indices.flatten().tolist() == y.argmax(-1).tolist()
    if straight_through:  # exactly the sampled codes' rows
        assert torch.equal(out.z_q.detach().movedim(1, -1).reshape(-1, 4), q.codebook.detach()[y.argmax(-1)])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
