"""The hyper-net codebook (``quantizer.codebook_mlp``): the codes are MLP(codebook), as in the authors' MQ-GAN code.

Checked against independent references: the codes and the quantizer's outputs by a float64 hand formula (tanh
layers, the affine map, l2, latent groups); ``[]`` against the plain codebook's own initialization formula; the
MQ-VAE iteration (Eq. 10-13) against the exact implicit term by double backward, for the embedding and every MLP
weight, with a mutation that drops the MLP's implicit term; the optimizer groups of the levels that train it; a short
run of the shipped MQ-VAE config; and the settings it cannot mean, each one line.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from betty.hypergradient import jvp_fn_mapping

import run
from helpers import RANDOM_START, enc_dec, float64, tiny_engine, two_levels  # noqa: F401  (float64: a fixture)
from engines.experiment import build_engine
from mqvae.config import QuantizerConfig, config_from_dict, load_config
from mqvae.errors import UserError
from mqvae.method.models import build_quantizer
from mqvae.nn.quantizers import VectorQuantizer
from mqvae.nn.quantizers.affine import VAR_EPS
from test_run import TINY

K, D = 16, 8  # codes, latent channels
MLP = {"codebook_mlp": [6], "kmeans_init": False}


def _z(b=2, h=3, w=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, D, h, w, generator=g, dtype=torch.float64)


def hand_mlp(x, layers):
    """The MLP by its formula: x W^T + b per layer, tanh between layers, none after the last."""
    for i, (weight, bias) in enumerate(layers):
        x = x @ weight.T + bias
        if i < len(layers) - 1:
            x = torch.tanh(x)
    return x


def linear_layers(q):
    """(weight, bias) of each Linear of the quantizer's MLP, detached, in order."""
    return [(m.weight.detach(), m.bias.detach()) for m in q.codebook_mlp if isinstance(m, torch.nn.Linear)]


# ---------------------------------------------------------------------------------------------
# 1. The codes are MLP(embedding): by hand, with groups, the affine maps and l2


@pytest.mark.parametrize("keys", [
    {},
    {"codebook_mlp": [5, 7]},
    {"groups": 2},
    {"affine": "learned", "affine_lr": 3.0, "affine_groups": 2},
    {"affine": "ema", "affine_groups": 2, "groups": 2},
    {"l2": True},
], ids=["one_hidden", "two_hidden", "groups", "affine_learned", "affine_ema_groups", "l2"])
def test_codes_and_outputs_are_the_mlp_of_the_embedding_by_hand(keys):
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(num_codes=K, dim=D, **{**MLP, **keys})).double()
    cfg, groups = q.cfg, q.cfg.groups
    d, per = D // groups, K // groups
    if cfg.affine == "learned":  # away from the identity (scale = 1 + r s, bias = r t, Huh A.1)
        with torch.no_grad():
            q.affine.s.copy_(0.3 * torch.randn_like(q.affine.s) / cfg.affine_lr)
            q.affine.t.copy_(0.2 * torch.randn_like(q.affine.t) / cfg.affine_lr)
    z_e = _z()
    z = z_e.permute(0, 2, 3, 1).reshape(-1, groups, d)
    embedding, layers = q.codebook.detach(), linear_layers(q)
    assert [w.shape[1] for w, _ in layers] == [d, *cfg.codebook_mlp] and layers[-1][0].shape[0] == d
    # Each latent group's slice of embeddings through the one MLP.
    raw = torch.cat([hand_mlp(embedding[g * per:(g + 1) * per], layers) for g in range(groups)])
    if cfg.affine == "ema":
        q.maintain(z_e, q(z_e).detached())  # the first update: the batch's moments
        by_affine = raw.reshape(cfg.affine_groups, K // cfg.affine_groups, d)
        # Huh Eq. 40-41's code moments are those of the codes the map receives, MLP(embedding), not the embedding.
        torch.testing.assert_close(q.affine.running_code_mean, by_affine.mean(1), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(q.affine.running_code_var, by_affine.var(1, correction=0), rtol=1e-12, atol=1e-14)
        members = [sorted({k // per for k in range(a * K // cfg.affine_groups, (a + 1) * K // cfg.affine_groups)})
                   for a in range(cfg.affine_groups)]
        ze = [z[:, m].reshape(-1, d) for m in members]
        scale = torch.stack([x.var(0, correction=0) for x in ze]) / (by_affine.var(1, correction=0) + VAR_EPS)
        scale = scale.sqrt()  # Huh Eq. 43, as affine.py derives it
        bias = torch.stack([x.mean(0) for x in ze]) - scale * by_affine.mean(1)
        codes = (by_affine * scale[:, None] + bias[:, None]).reshape(K, d)
    elif cfg.affine == "learned":
        r = cfg.affine_lr
        scale, bias = 1 + r * q.affine.s.detach(), r * q.affine.t.detach()
        codes = (raw.reshape(cfg.affine_groups, -1, d) * scale[:, None] + bias[:, None]).reshape(K, d)
    else:
        codes = raw
    if cfg.l2:
        codes, z = codes / codes.norm(dim=1, keepdim=True), z / z.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(q.effective_codebook().detach(), codes, rtol=1e-12, atol=1e-14)

    out = q(z_e)
    for g in range(groups):  # the nearest hand code within the group's own slice
        dist = ((z[:, g, None, :] - codes[None, g * per:(g + 1) * per]) ** 2).sum(-1)
        assert torch.equal(out.indices[:, g], dist.argmin(1) + g * per)
    chosen = codes[out.indices]
    mse = ((z - chosen) ** 2).mean()
    torch.testing.assert_close(out.losses["codebook"], mse, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.losses["commitment"], mse, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.z_q.permute(0, 2, 3, 1).reshape(-1, groups, d), chosen, rtol=1e-12, atol=1e-14)


def test_a_step_on_the_codebook_loss_moves_codes_no_vector_selected():
    # The MLP is shared: an unselected code's embedding gets no gradient, but its code moves with the MLP's weights.
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(num_codes=64, dim=D, **MLP)).double()
    out = q(_z(b=1, h=2, w=2))  # 4 vectors, 64 codes
    unused = out.counts == 0
    assert unused.sum() >= 60
    out.losses["codebook"].backward()
    assert torch.equal(q.codebook.grad[unused], torch.zeros_like(q.codebook.grad[unused]))
    assert all(p.grad.abs().sum() > 0 for p in q.codebook_mlp.parameters())
    before = q.effective_codebook().detach().clone()
    with torch.no_grad():
        for p in q.parameters():
            p -= 0.1 * p.grad
    assert ((q.effective_codebook().detach() - before).norm(dim=1)[unused] > 0).all()


def test_the_embedding_and_the_layers_start_as_the_authors_do():
    # Their nn.Embedding: N(0, 1); their nn.Linear layers keep torch's initialization (U(-1/sqrt(fan_in), ...)).
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(num_codes=4096, dim=16, codebook_mlp=[256], kmeans_init=False))
    assert abs(q.codebook.mean().item()) < 0.01 and abs(q.codebook.std().item() - 1) < 0.01
    for weight, bias in linear_layers(q):
        bound = weight.shape[1] ** -0.5
        assert weight.abs().max() <= bound and bias.abs().max() <= bound
        assert weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)  # a uniform's std


# ---------------------------------------------------------------------------------------------
# 2. codebook_mlp: [] is the plain codebook


def test_an_empty_mlp_is_the_plain_codebook_bit_for_bit():
    torch.manual_seed(3)
    q = build_quantizer(QuantizerConfig(num_codes=K, dim=D, codebook_mlp=[]))
    after_build = torch.get_rng_state()
    # The plain codebook's draw by its formula, and nothing drawn after it (the networks' draws come next).
    torch.manual_seed(3)
    expected = torch.empty(K, D).uniform_(-1 / K, 1 / K)
    assert torch.equal(torch.get_rng_state(), after_build)
    assert torch.equal(q.codebook.detach(), expected)
    assert q.codebook_mlp is None and [p for p in q.parameters()] == [q.codebook]
    assert set(q.state_dict()) == {"codebook"}
    assert q.effective_codebook() is q.codebook  # no op between the parameter and the search
    out = q(_z().float())
    assert torch.equal(out.z_q.permute(0, 2, 3, 1).reshape(-1, D), expected[out.indices[:, 0]])
    assert VectorQuantizer.size(q.cfg) == (K * D, 8 * K)


# ---------------------------------------------------------------------------------------------
# 3. The task loss still cannot reach the codes: the quantizer-terms shortcut of Eq. 13 and the xi = 0 step is exact


def test_the_task_loss_does_not_reach_the_mlp_and_the_quantizer_terms_give_the_whole_gradient(tmp_path, float64):
    engine = tiny_engine(tmp_path, data={"name": "digits64", "batch_size": 16}, quantizer={**RANDOM_START, **MLP})
    model, batch = engine.model, tuple(t[:16] for t in engine.datasets.train.tensors)
    upper = list(model.quantizer.parameters())
    assert not model.quantizer.task_reaches_codebook
    terms = model.loss(batch)
    assert all(g is None for g in torch.autograd.grad(terms["task"], upper, retain_graph=True, allow_unused=True))
    whole = torch.autograd.grad(terms["loss"], upper)
    shortcut = torch.autograd.grad(model.quantization_terms(batch)["loss"], upper)
    assert all(g.abs().sum() > 0 for g in whole)
    for a, b in zip(whole, shortcut):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# 4. The level that trains the quantizer trains the embedding and the MLP, at the quantizer's lr


def test_the_levels_that_train_the_quantizer_hold_the_mlp_at_the_quantizers_lr(tmp_path):
    engine = tiny_engine(tmp_path / "two", levels=two_levels(codebook_lr=3e-3, autoencoder_lr=1e-2),
                         quantizer={**RANDOM_START, **MLP})
    quantizer = engine.model.quantizer
    mlp = list(quantizer.codebook_mlp.parameters())
    assert len(mlp) == 4 and all(p.requires_grad for p in mlp)
    ids = [id(p) for p in [quantizer.codebook, *mlp]]
    assert [id(p) for p in engine.codebook.trainable_parameters()] == ids
    (group,) = engine.codebook.optimizer.param_groups
    assert [id(p) for p in group["params"]] == ids and group["lr"] == 3e-3
    assert not set(ids) & {id(p) for p in engine.autoencoder.trainable_parameters()}

    level = {"name": "vqvae", "problem": "VQVAE", "lr": 1e-2, "params": {"codebook_lr": 4e-3}}
    engine = tiny_engine(tmp_path / "one", levels=[level], quantizer={**RANDOM_START, **MLP})
    quantizer = engine.model.quantizer
    rest, own = engine.vqvae.optimizer.param_groups
    assert [id(p) for p in own["params"]] == [id(p) for p in quantizer.parameters()] and own["lr"] == 4e-3
    assert rest["lr"] == 1e-2 and not {id(p) for p in rest["params"]} & {id(p) for p in quantizer.parameters()}


# ---------------------------------------------------------------------------------------------
# 5. MQ-VAE's Eq. 13 with the hyper-net codebook against the exact implicit term


XI, UPPER_LR = 0.2, 1.0
# Eq. 13's radius: eps = ALPHA / ||v||. Measured on this batch, the engine's implicit term against the exact one,
# relative per parameter tensor: 3e-5 to 4e-5 at the shipped 0.01 and 3e-6 at 1e-3 (linear in alpha, as from kinks of
# the encoder's ReLUs that the perturbed passes cross; with dim 4, 19 of the passes' 512 code assignments change at
# 0.01 as well, and the difference is 10 to 20 times the smooth term), 5e-12 to 9e-12 at 1e-4, where nothing crosses.
ALPHA = 1e-4
FD_TOL = 1e-9


def exact_implicit_term(model, batch, pre, v, xi):
    """Eq. 13's implicit term without the finite difference: -xi (d/dphi grad_U L(phi, U)) v at the pre-step phi,
    for U the embedding and the MLP's weights and biases. Eq. 13 differentiates grad_U L in phi; grad_U L comes from
    the codebook term cw * mean(sg[z_e] - q)^2 alone (plain straight-through), which reads z_e by value, so the
    reference writes that term with z_e not detached, ell(phi, U) = cw * mean(z_e(phi) - MLP(E)[idx])^2 with idx the
    nearest codes at phi, and takes the mixed derivative by double backward through phi' = phi - xi grad_phi ell:
    d/dU [v . phi'(U)] = -xi d/dU (grad_phi ell . v), which is -xi (d/dphi grad_U ell) v by the symmetry of ell's
    second derivatives. The decoder theta does not enter grad_U L: its part of v contributes nothing."""
    q, lower = model.quantizer, enc_dec(model)
    with torch.no_grad():
        for p, p0 in zip(lower, pre):
            p.copy_(p0)
    z = model.encoder(batch[0]).permute(0, 2, 3, 1).reshape(-1, D)
    weights = [m for m in q.codebook_mlp if isinstance(m, torch.nn.Linear)]
    codes = hand_mlp(q.codebook, [(m.weight, m.bias) for m in weights])
    idx = torch.cdist(z.detach(), codes.detach()).argmin(1)
    ell = q.cfg.codebook_weight * (z - codes[idx]).pow(2).mean()
    grad_phi = torch.autograd.grad(ell, lower, create_graph=True, allow_unused=True)
    phi_prime = sum(((p - xi * g) * vi).sum() for p, g, vi in zip(lower, grad_phi, v) if g is not None)
    return torch.autograd.grad(phi_prime, list(q.parameters()))


def without_mlp_implicit_terms(monkeypatch, engine):
    """The mutation: Eq. 13's implicit term with the MLP's entries set to zero (the embedding's kept)."""
    original = jvp_fn_mapping["mqvae"]
    mlp = {id(p) for p in engine.model.quantizer.codebook_mlp.parameters()}

    def dropped(vector, curr, prev, sync):
        terms = original(vector, curr, prev, sync)
        return [torch.zeros_like(t) if id(p) in mlp else t for t, p in zip(terms, prev.trainable_parameters())]

    monkeypatch.setitem(jvp_fn_mapping, "mqvae", dropped)


@pytest.mark.parametrize("mutated", [False, True], ids=["engine", "mlp_implicit_dropped"])
def test_eq13_with_the_mlp_codebook_equals_the_exact_implicit_term(tmp_path, float64, monkeypatch, mutated):
    # SGD on both levels: the tentative step is Eq. 10's phi - xi grad_phi L, and the codebook's gradient is what its
    # optimizer receives (direct + implicit), read at its step.
    engine = tiny_engine(tmp_path, levels=two_levels(codebook_lr=UPPER_LR, autoencoder_lr=XI, optimizer="sgd"),
                         data={"name": "digits64", "batch_size": 16}, quantizer={**RANDOM_START, **MLP, "dim": D},
                         hypergradient={"type": "mqvae", "alpha": ALPHA})
    if mutated:
        without_mlp_implicit_terms(monkeypatch, engine)
    model = copy.deepcopy(engine.model)
    received = []
    engine.codebook.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: received.extend(p.grad.clone() for g in optimizer.param_groups for p in g["params"]))
    engine.train_step()
    batch = engine.autoencoder.cur_batch

    # The reference iteration in plain torch: the tentative step, then v and the direct term at phi'.
    lower, upper = enc_dec(model), list(model.quantizer.parameters())
    pre = [p.detach().clone() for p in lower]
    step = torch.autograd.grad(model.loss(batch)["loss"], lower)
    with torch.no_grad():
        for p, g in zip(lower, step):
            p -= XI * g
    for got, want in zip(enc_dec(engine.model), lower):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    grads = torch.autograd.grad(model.loss(batch)["loss"], upper + lower, allow_unused=True)
    direct = grads[:len(upper)]
    v = [torch.zeros_like(p) if g is None else g for g, p in zip(grads[len(upper):], lower)]
    implicit = exact_implicit_term(model, batch, pre, v, XI)

    names = [name for name, _ in model.quantizer.named_parameters()]
    assert names == ["codebook", "codebook_mlp.0.weight", "codebook_mlp.0.bias", "codebook_mlp.2.weight",
                     "codebook_mlp.2.bias"] and len(received) == len(names)
    errors = {name: float((got - d - i).norm() / i.norm()) for name, got, d, i in zip(names, received, direct, implicit)}
    for name, got, i in zip(names, received, implicit):
        # The implicit term matters: a tenth of a percent and more of the gradient, 1e6 times FD_TOL.
        assert i.norm() > 1e-3 * got.norm(), name
    if not mutated:
        assert all(error < FD_TOL for error in errors.values()), errors
    else:  # the comparison sees an MLP without its implicit term, and only there
        assert errors["codebook"] < FD_TOL and all(errors[name] == pytest.approx(1.0) for name in names[1:]), errors


# ---------------------------------------------------------------------------------------------
# 6. A short run of the shipped MQ-VAE config with the hyper-net codebook


def test_two_iterations_of_the_shipped_mqvae_config_train_the_mlp(tmp_path):
    out = tmp_path / "run"
    args = ["configs/digits/mqvae.yaml", *TINY, "--set", "train.iters=2", "--set", "train.eval_every=0",
            "--set", "threads=1", "--set", "quantizer.codebook_mlp=[32]", "--set", "quantizer.kmeans_init=false",
            "--out", str(out)]
    assert run.main(args) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "codebook.implicit_norm" in r]
    assert len(steps) == 2 and all(r["codebook.implicit_norm"] > 0 for r in steps)
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["levels"]["codebook"]
    # The start, as the run's resolved config builds it (same seed, same start).
    start = build_engine(load_config(out / "config.yaml"), tmp_path / "start").codebook.module.state_dict()
    assert set(trained) == set(start) == {"codebook", "codebook_mlp.0.weight", "codebook_mlp.0.bias",
                                          "codebook_mlp.2.weight", "codebook_mlp.2.bias"}
    assert trained["codebook_mlp.0.weight"].shape == (32, 16) and trained["codebook_mlp.2.weight"].shape == (16, 32)
    for name, value in start.items():
        assert torch.isfinite(trained[name]).all() and not torch.equal(trained[name], value), name


# ---------------------------------------------------------------------------------------------
# 7. What it cannot mean is one line


@pytest.mark.parametrize("keys, named", [
    ({"codebook_mlp": [256]}, ["quantizer.kmeans_init: true", "quantizer.codebook_mlp: [256]", "kmeans_init: false"]),
    ({"codebook_mlp": [8], "kmeans_init": False, "replace_freq": 20},
     ["quantizer.replace_freq: 20", "quantizer.codebook_mlp: [8]", "replace_freq: 0"]),
    ({"codebook_mlp": [8], "kind": "gumbel", "kmeans_init": False}, ["quantizer.codebook_mlp", "quantizer.kind"]),
])
def test_what_the_mlp_cannot_mean_is_one_line_at_build(keys, named):
    with pytest.raises(UserError) as info:
        build_quantizer(QuantizerConfig(num_codes=K, dim=D, **keys))
    message = str(info.value)
    assert "\n" not in message and all(needle in message for needle in named), message


@pytest.mark.parametrize("widths, named", [([0], "quantizer.codebook_mlp.0: 0 is below the minimum 1"),
                                           ([8, -2], "quantizer.codebook_mlp.1: -2 is below the minimum 1"),
                                           (8, "quantizer.codebook_mlp: expected a list")])
def test_a_width_below_one_is_one_line_at_load(widths, named):
    with pytest.raises(UserError) as info:
        config_from_dict({"quantizer": {"codebook_mlp": widths, "kmeans_init": False},
                          "levels": [{"name": "vqvae", "problem": "VQVAE"}]}, "x.yaml")
    assert "\n" not in str(info.value) and named in str(info.value), str(info.value)


@pytest.mark.parametrize("call", ["initialize", "apply_replacement"])
def test_a_standalone_quantizer_refuses_to_write_the_mlps_codes(call):
    # Built without build_quantizer (a standalone loop), check_settings never ran.
    q = VectorQuantizer(QuantizerConfig(num_codes=K, dim=D, codebook_mlp=[8]))
    with pytest.raises(UserError, match="not defined with quantizer.codebook_mlp: \\[8\\]") as info:
        if call == "initialize":
            q.initialize(_z().float())
        else:
            q.apply_replacement(torch.zeros(K, dtype=torch.long), torch.zeros(K, D))
    assert "\n" not in str(info.value)
