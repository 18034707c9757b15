"""The ablation that tells MQ-VAE's hypergradient from its codebook's optimizer (configs/fashion_mnist/).

The paper's VQ-VAE trains its codebook inside the joint optimizer at the encoder-decoder's lr; its MQ-VAE trains the
codebook as a level of its own at a 200x higher lr. ``VQVAE.Params.codebook_lr`` gives VQ-VAE's codebook a parameter
group at the upper level's lr. Its codebook update must be exactly the one MQ-VAE's upper level makes at xi = 0 (no
look-ahead, so no tentative step and no implicit term, whatever the hypergradient type), and both must equal a
hand-written update: Eq. 5's gradient from a naive nearest-code search, then the optimizer's formula, in float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers import float64, tiny_engine, two_levels  # noqa: F401  (float64: a fixture)

LOWER_LR, CODEBOOK_LR, WEIGHT_DECAY = 1e-3, 6e-2, 1e-2


def _level(name, problem, optimizer, lr, **extra):
    return {"name": name, "problem": problem, "optimizer": optimizer, "lr": lr, "weight_decay": WEIGHT_DECAY,
            **({"momentum": 0.0} if optimizer == "sgd" else {}), **extra}


def _engines(tmp_path, optimizer):
    common = {"data": {"name": "digits64", "batch_size": 16}}
    vqvae = tiny_engine(tmp_path / "vqvae", levels=[
        _level("vqvae", "VQVAE", optimizer, LOWER_LR, params={"codebook_lr": CODEBOOK_LR})], **common)
    levels = two_levels(CODEBOOK_LR, LOWER_LR, optimizer)
    for level in levels:
        level.update(weight_decay=WEIGHT_DECAY, **({"momentum": 0.0} if optimizer == "sgd" else {}))
    mqvae_direct = tiny_engine(tmp_path / "mqvae", levels=levels, hypergradient={"type": "direct", "xi": 0.0}, **common)
    return vqvae, mqvae_direct


def _codebook_gradient(model, batch) -> torch.Tensor:
    """Eq. 5's gradient by hand: d/dC mean((sg[z_e] - C_k)^2) = 2 (C_k - z_e) / (N D) summed over the vectors whose
    nearest code is k (a naive search over every code). Eq. 4 and the task loss do not reach C under the plain
    straight-through estimator (Eq. 3)."""
    with torch.no_grad():
        z = model.encoder(batch[0]).movedim(1, -1).reshape(-1, model.quantizer.codebook.shape[1])
        codes = model.quantizer.codebook
        nearest = ((z[:, None, :] - codes[None, :, :]) ** 2).sum(-1).argmin(1)
        grad = torch.zeros_like(codes)
        for i, k in enumerate(nearest.tolist()):
            grad[k] += 2 * (codes[k] - z[i]) / z.numel()
    return grad


def _hand_step(param: torch.Tensor, grad: torch.Tensor, optimizer: str, lr: float) -> torch.Tensor:
    """One first step of the optimizer by its formula (torch's defaults: AdamW betas (0.9, 0.999), eps 1e-8)."""
    if optimizer == "sgd":  # weight decay added to the gradient; the first momentum buffer is the gradient
        return param - lr * (grad + WEIGHT_DECAY * param)
    # AdamW: decoupled decay, then m/(sqrt(v)+eps) with the bias corrections of step 1 (m_hat = g, v_hat = g^2)
    decayed = param * (1 - lr * WEIGHT_DECAY)
    return decayed - lr * grad / (grad.abs() + 1e-8)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_vqvae_codebook_at_the_upper_lr_is_mqvae_direct_codebook_update_at_xi_zero(tmp_path, float64, optimizer):
    vqvae, mqvae_direct = _engines(tmp_path, optimizer)
    assert vqvae.model.quantizer.codebook.dtype == torch.float64
    # Same seed, same start: the same networks, codebook and first batch.
    for a, b in zip(vqvae.model.state_dict().values(), mqvae_direct.model.state_dict().values()):
        assert torch.equal(a, b)
    start = copy.deepcopy(vqvae.model)
    codebook = start.quantizer.codebook.detach()

    vqvae.train_step()
    mqvae_direct.train_step()
    batch = vqvae.vqvae.cur_batch
    assert all(torch.equal(a, b) for a, b in zip(batch, mqvae_direct.codebook.cur_batch))

    grad = _codebook_gradient(start, batch)
    assert grad.abs().sum() > 0
    want = _hand_step(codebook, grad, optimizer, CODEBOOK_LR)
    assert not torch.allclose(want, _hand_step(codebook, grad, optimizer, LOWER_LR))  # the lr matters
    torch.testing.assert_close(vqvae.model.quantizer.codebook.detach(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mqvae_direct.model.quantizer.codebook.detach(), want, rtol=1e-12, atol=1e-12)

    # The encoder-decoder keeps the joint lr: its step is the optimizer's formula at LOWER_LR on Eq. 6's gradient
    # at the starting parameters (VQ-VAE steps all parameters at once, on one gradient).
    lower = list(start.encoder.parameters()) + list(start.decoder.parameters())
    grads = torch.autograd.grad(start.loss(batch)["loss"], lower)
    got = list(vqvae.model.encoder.parameters()) + list(vqvae.model.decoder.parameters())
    for g, p, new in zip(grads, lower, got):
        torch.testing.assert_close(new.detach(), _hand_step(p.detach(), g, optimizer, LOWER_LR), rtol=1e-10, atol=1e-12)


def test_codebook_lr_covers_the_learned_affine_parameters_too(tmp_path):
    # A learned affine map's s and t train at the lr of the level that trains the quantizer (affine_lr acts inside
    # the map, Huh A.1); in VQ-VAE with codebook_lr that lr is codebook_lr, as in MQ-VAE's codebook level, so the
    # two stay the same ablation with an affine map.
    engine = tiny_engine(tmp_path, levels=[_level("vqvae", "VQVAE", "adamw", LOWER_LR, params={"codebook_lr": CODEBOOK_LR})],
                         quantizer={"affine": "learned", "affine_lr": 5.0})
    quantizer = engine.model.quantizer
    groups = engine.vqvae.optimizer.param_groups
    lrs = [group["initial_lr"] if "initial_lr" in group else group["lr"] for group in groups]
    assert [math.isclose(a, b) for a, b in zip(lrs, [LOWER_LR, CODEBOOK_LR])] == [True, True] and len(groups) == 2
    assert groups[1]["params"] == [quantizer.codebook, quantizer.affine.s, quantizer.affine.t]
