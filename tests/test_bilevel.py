"""The bi-level core against independent references: exact autograd through the unrolled step,
plain-torch Algorithm 1 (with and without roll-back), Huh Eq. 17-18 for xi = 0, and purity."""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from betty.hypergradient import jvp_fn_mapping
from torch import nn
from torch.utils.data import TensorDataset

from engines.build import build_problems
from engines.engine import LevelEngine
from mqvae.method import hypergradients
from mqvae.config import config_from_dict
from mqvae.errors import UserError
from mqvae.method.hypergradients import HypergradientContext, register_hypergradient
from problems import AutoEncoder, Level, register_problem

from helpers import PLAIN, float64, snapshot, tiny_engine, two_levels  # noqa: F401  (float64: a fixture)

# ---------------------------------------------------------------------------------------------
# 1. A smooth toy two-level problem in float64: the engine's hypergradient equals autograd's
#    d/dC L(phi - xi * grad_phi L(phi, C), C).


def toy_loss(phi, c, x):
    # Non-quadratic in phi, so the mixed derivative at the pre-step and post-step points differ.
    return ((x @ phi - 1) ** 2).mean() + (phi * c).sum() ** 2 + 0.5 * ((phi - c) ** 2).sum() + (torch.sin(phi) * c).sum()


class Holder(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.w = nn.Parameter(value.clone())


class ToyModel(nn.Module):
    def __init__(self, d=5):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.lower = Holder(0.5 * torch.randn(d, generator=g, dtype=torch.float64))
        self.upper = Holder(0.5 * torch.randn(d, generator=g, dtype=torch.float64))

    def loss(self, batch, weights=None):
        return {"loss": toy_loss(self.lower.w, self.upper.w, batch[0])}


@register_problem
class ToyLower(Level):
    @classmethod
    def module_of(cls, model, params):
        return model.lower


@register_problem
class ToyUpper(Level):
    @classmethod
    def module_of(cls, model, params):
        return model.upper

    def custom_optimizer_step(self):
        self.recorded = [p.grad.detach().clone() for p in self.trainable_parameters()]
        self.optimizer.step()


def toy_engine(tmp_path, xi, hypergradient_type="mqvae", batch_size=12, **hypergradient):
    """The toy problem on 12 items (one batch of all of them by default), SGD on both levels; ``hypergradient``:
    further keys of the config's section."""
    cfg = config_from_dict({
        "device": "cpu",
        "data": {"batch_size": batch_size},
        "levels": [
            {"name": "upper", "problem": "ToyUpper", "optimizer": "sgd", "lr": 0.1, **PLAIN, "lower": ["lower"]},
            {"name": "lower", "problem": "ToyLower", "optimizer": "sgd", "lr": xi, **PLAIN},
        ],
        "hypergradient": {"type": hypergradient_type, "xi": None, "alpha": 0.01, **hypergradient},
    }, "<toy>")
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    datasets = SimpleNamespace(train=TensorDataset(x, torch.zeros(12)), test=None)
    model = ToyModel()
    problems, deps = build_problems(cfg, model, datasets, torch.device("cpu"))
    return LevelEngine(cfg, problems, deps, model, datasets, torch.device("cpu"), tmp_path), model


def unrolled_hypergradient(phi0, c0, x, xi):
    phi, c = phi0.clone().requires_grad_(), c0.clone().requires_grad_()
    (g_phi,) = torch.autograd.grad(toy_loss(phi, c, x), phi, create_graph=True)
    (hyper,) = torch.autograd.grad(toy_loss(phi - xi * g_phi, c, x), c)
    return hyper


def fd_variant(phi0, c0, x, xi, at_post_step=False, scale=True):
    """Eq. 13 computed by hand, optionally with the mistakes the engine must not make."""
    phi, c = phi0.clone().requires_grad_(), c0.clone().requires_grad_()
    phi1 = (phi0 - xi * torch.autograd.grad(toy_loss(phi, c, x), phi)[0]).requires_grad_()
    v, direct = torch.autograd.grad(toy_loss(phi1, c, x), (phi1, c))
    eps = 0.01 / v.norm()
    base = phi1.detach() if at_post_step else phi0

    def grad_c(p):
        return torch.autograd.grad(toy_loss(p, c, x), c)[0]

    implicit = -(grad_c(base + eps * v) - grad_c(base - eps * v)) / (2 * eps)
    return direct + (xi if scale else 1.0) * implicit


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("xi", [0.05, 0.2])
def test_engine_hypergradient_equals_autograd_through_the_unrolled_step(tmp_path, xi):
    engine, model = toy_engine(tmp_path, xi)
    phi0, c0 = model.lower.w.detach().clone(), model.upper.w.detach().clone()
    engine.train_step()
    x = engine.lower.cur_batch[0]
    reference = unrolled_hypergradient(phi0, c0, x, xi)
    produced = engine.upper.recorded[0]
    assert relative_error(produced, reference) < 1e-4

    # The comparison is sharp enough to catch each of the mistakes Eq. 13 invites.
    c = c0.clone().requires_grad_()
    phi = phi0.clone().requires_grad_()
    post = (phi0 - xi * torch.autograd.grad(toy_loss(phi, c0, x), phi)[0]).detach()
    direct = torch.autograd.grad(toy_loss(post, c, x), c)[0]
    for wrong in (direct, fd_variant(phi0, c0, x, xi, at_post_step=True), fd_variant(phi0, c0, x, xi, scale=False)):
        assert relative_error(wrong, reference) > 1e-3
    assert relative_error(fd_variant(phi0, c0, x, xi), reference) < 1e-4


# ---------------------------------------------------------------------------------------------
# 2. One engine iteration on a tiny VQ-VAE equals Algorithm 1 written in plain torch.


def enc_dec_parameters(model):
    return list(model.encoder.parameters()) + list(model.decoder.parameters())


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def algorithm_1(model, batch, lr, xi, alpha, roll_back, optimizers=None, terms=None):
    """MQ-VAE Algorithm 1 / Eq. 10-13 in plain torch, with the toolkit's default order (roll_back=False).
    One iteration; pass the returned optimizers back in to continue. ``terms`` (a dict) receives the direct and
    implicit terms of the codebook's step."""
    lower, codebook = enc_dec_parameters(model), [model.quantizer.codebook]
    opt_lower, opt_upper = optimizers or (torch.optim.Adam(lower, lr=lr), torch.optim.Adam(codebook, lr=lr))
    pre = [p.detach().clone() for p in lower]
    opt_lower_state = copy.deepcopy(opt_lower.state_dict())

    def loss():
        return model.loss(batch)["loss"]

    # 1. tentative lower step
    set_grads(lower, torch.autograd.grad(loss(), lower))
    opt_lower.step()
    opt_lower.zero_grad()
    # 2. v and the direct term at the post-step parameters
    grads = torch.autograd.grad(loss(), codebook + lower)
    direct, v = grads[0], grads[1:]
    # 3. Eq. 13 around the pre-step parameters (full loss: no shortcut here). The model stays in training mode,
    # so BatchNorm uses batch statistics here as in steps 1-2; the running statistics the passes touch are put back.
    eps = alpha / torch.cat([t.reshape(-1) for t in v]).norm()
    post = [p.detach().clone() for p in lower]
    statistics = [b.detach().clone() for b in model.buffers()]
    fd = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, p0, vi in zip(lower, pre, v):
                p.copy_(p0 + sign * eps * vi)
        fd.append(torch.autograd.grad(loss(), codebook)[0])
    with torch.no_grad():
        for p, p1 in zip(lower, post):
            p.copy_(p1)
        for b, saved in zip(model.buffers(), statistics):
            b.copy_(saved)
    implicit = -xi * (fd[0] - fd[1]) / (2 * eps)
    if terms is not None:
        terms.update(direct=direct.detach().clone(), implicit=implicit.detach().clone())
    # 4. codebook step
    codebook[0].grad = direct + implicit
    opt_upper.step()
    # 5. roll back and take the real lower step with the updated codebook on the same batch
    if roll_back:
        with torch.no_grad():
            for p, p0 in zip(lower, pre):
                p.copy_(p0)
        opt_lower.load_state_dict(opt_lower_state)
        set_grads(lower, torch.autograd.grad(loss(), lower))
        opt_lower.step()
    return opt_lower, opt_upper


def assert_optimizer_states_close(a, b):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        for name in sa[key]:
            torch.testing.assert_close(torch.as_tensor(sa[key][name]), torch.as_tensor(sb[key][name]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("roll_back", [False, True])
def test_one_iteration_equals_plain_torch_algorithm_1(tmp_path, roll_back):
    engine = tiny_engine(tmp_path, hypergradient={"roll_back": roll_back, "alpha": 0.01})
    reference = copy.deepcopy(engine.model)
    engine.train_step()
    batch = engine.autoencoder.cur_batch
    terms = {}
    opt_lower, opt_upper = algorithm_1(reference, batch, lr=1e-2, xi=1e-2, alpha=0.01, roll_back=roll_back, terms=terms)

    for (name, got), (_, want) in zip(engine.model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert_optimizer_states_close(engine.autoencoder.optimizer, opt_lower)
    assert_optimizer_states_close(engine.codebook.optimizer, opt_upper)
    # The codebook moved, and roll-back on and off give different lower parameters (they are different orders).
    assert not torch.equal(engine.model.quantizer.codebook, tiny_engine(tmp_path / "fresh").model.quantizer.codebook)
    # Fig. 6's quantities of the step, from the terms the reference took.
    d, i = terms["direct"].reshape(-1).double(), terms["implicit"].reshape(-1).double()
    stats = engine.codebook.hypergradient_stats()
    want = {"direct_norm": d.norm(), "implicit_norm": i.norm(), "cosine": d @ i / (d.norm() * i.norm()),
            "implicit_ratio": i.norm() / d.norm()}
    for key, value in want.items():
        torch.testing.assert_close(stats[key], value, rtol=1e-3, atol=1e-9, msg=lambda m: f"{key}: {m}")


def assert_models_close(got, want):
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def warmup_cosine(step, total, warmup):
    """MQ-VAE App. I's schedule by its formula: linear warm-up to the base lr, then cosine to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_xi_is_the_scheduled_learning_rate_of_every_tentative_step(tmp_path):
    # SGD with warm-up and cosine on both levels: Eq. 10's xi is the lr the tentative step used at that iteration
    # (here 1/3, 2/3, 1, 1, 0.75, 0.25 of the base lr), not the base lr.
    iters, lr = 6, 0.05
    levels = [{**level, "scheduler": "warmup_cosine", "warmup_ratio": 0.5} for level in two_levels(lr, lr, "sgd")]
    engine = tiny_engine(tmp_path, levels=levels, train={"iters": iters, "log_every": 1})
    reference = copy.deepcopy(engine.model)
    optimizers = (torch.optim.SGD(enc_dec_parameters(reference), lr=lr),
                  torch.optim.SGD([reference.quantizer.codebook], lr=lr))
    for step in range(iters):
        scheduled = lr * warmup_cosine(step, iters, warmup=3)
        for optimizer in optimizers:
            optimizer.param_groups[0]["lr"] = scheduled
        engine.train_step()
        algorithm_1(reference, engine.autoencoder.cur_batch, lr, xi=scheduled, alpha=0.01, roll_back=False,
                    optimizers=optimizers)
        assert engine.autoencoder.xi == pytest.approx(scheduled, rel=1e-12)
    assert_models_close(engine.model, reference)


def test_every_optimizer_step_of_a_roll_back_run_uses_the_scheduled_lr(tmp_path):
    # With roll-back the lower level steps twice per iteration (tentative, then real, after restoring its optimizer
    # and schedule state): both steps use that iteration's lr, and the schedule advances once per iteration. The
    # lr every optimizer.step sees is compared with warm-up + cosine by its formula.
    iters, lr = 6, 0.05
    levels = [{**level, "scheduler": "warmup_cosine", "warmup_ratio": 0.5} for level in two_levels(lr, lr, "sgd")]
    engine = tiny_engine(tmp_path, levels=levels, hypergradient={"roll_back": True},
                         train={"iters": iters, "log_every": 1})
    seen = {"autoencoder": [], "codebook": []}
    for name, lrs in seen.items():
        getattr(engine, name).optimizer.register_step_pre_hook(
            lambda optimizer, args, kwargs, _lrs=lrs: _lrs.extend(g["lr"] for g in optimizer.param_groups))
    for _ in range(iters):
        engine.train_step()
    scheduled = [lr * warmup_cosine(step, iters, warmup=3) for step in range(iters)]
    assert seen["codebook"] == pytest.approx(scheduled, rel=1e-12)
    assert seen["autoencoder"] == pytest.approx([x for x in scheduled for _ in range(2)], rel=1e-12)


CODEBOOK_WEIGHT = 3.0


@register_problem
class ReweightedAutoEncoder(AutoEncoder):
    """A lower level with a loss of its own: the codebook term of Eq. 6 weighted 3x."""

    def loss_terms(self, batch):
        return self.model.loss(batch, weights={"codebook": CODEBOOK_WEIGHT})


@pytest.mark.parametrize("quantizer, lower, loss", [
    ({"sync_nu": 1.0}, "AutoEncoder", lambda model, batch: model.loss(batch)["loss"]),
    ({"sync_nu": 0.5, "affine": "learned"}, "AutoEncoder", lambda model, batch: model.loss(batch)["loss"]),
    ({}, "ReweightedAutoEncoder", lambda model, batch: model.loss(batch, weights={"codebook": CODEBOOK_WEIGHT})["loss"]),
], ids=["sync", "sync_affine", "own_loss"])
def test_eq13_is_a_plain_finite_difference_of_the_lower_levels_whole_loss(tmp_path, float64, quantizer, lower, loss):
    # With sync_nu > 0 the task loss reaches the codes (and a learned affine map), through the decoder: Eq. 13
    # must then evaluate the whole loss, and perturb the decoder theta as well as the encoder phi. A lower level
    # with a loss of its own (a plugin's) must have Eq. 13 differentiate that loss, not the default quantizer terms.
    # Reference: the central difference by hand in float64, every lower parameter at pre-step +- eps v.
    levels = two_levels()
    levels[1]["problem"] = lower
    engine = tiny_engine(tmp_path, levels=levels, quantizer=quantizer, data={"name": "digits64", "batch_size": 16})
    before = copy.deepcopy(engine.model)
    engine.train_step()
    ae, cb = engine.autoencoder, engine.codebook
    generator = torch.Generator().manual_seed(5)
    vector = [torch.randn(p.shape, generator=generator) for p in ae.trainable_parameters()]
    xi = 0.01
    got = implicit_term_for(engine, vector, xi)

    model = copy.deepcopy(engine.model)  # the current codebook, and the lower level moved to pre-step +- eps v
    lower, pre = enc_dec_parameters(model), [p.detach() for p in enc_dec_parameters(before)]
    uppers = list(model.quantizer.parameters())
    assert len(uppers) == len(cb.trainable_parameters()) and len(lower) == len(vector)
    eps = 0.01 / torch.sqrt(sum((v ** 2).sum() for v in vector))
    grads = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, p0, v in zip(lower, pre, vector):
                p.copy_(p0 + sign * eps * v)
        grads.append(torch.autograd.grad(loss(model, ae.cur_batch), uppers))
    want = [-xi * (plus - minus) / (2 * eps) for plus, minus in zip(*grads)]
    assert any(w.abs().sum() > 0 for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-12)


def test_batch_norm_model_equals_algorithm_1_in_training_mode(tmp_path):
    # Eq. 13 differentiates one function: the perturbed passes use batch statistics as v and the direct term do.
    # SGD, because a convolution bias right before BatchNorm has a zero gradient up to rounding, which Adam
    # would scale up to full steps of noise.
    lr = 0.05
    engine = tiny_engine(tmp_path, model={"norm": "batch"}, levels=two_levels(lr, lr, "sgd"), hypergradient={"alpha": 0.01})
    reference = copy.deepcopy(engine.model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in reference.modules()) and reference.training
    optimizers = (torch.optim.SGD(enc_dec_parameters(reference), lr=lr),
                  torch.optim.SGD([reference.quantizer.codebook], lr=lr))
    for _ in range(3):
        engine.train_step()
        algorithm_1(reference, engine.autoencoder.cur_batch, lr, xi=lr, alpha=0.01, roll_back=False, optimizers=optimizers)
    assert_models_close(engine.model, reference)  # parameters and running statistics


# Algorithm 1 with roll-back runs the encoder in the tentative step, at the post-step parameters (v and the direct
# term), in Eq. 13's two finite-difference passes and in the real step.
ROLL_BACK_FORWARDS = 5


def encoder_forwards(engine, iterations=1) -> list[int]:
    """The encoder forwards of each of ``iterations`` training iterations, counted by a forward hook."""
    counts = []
    handle = engine.model.encoder.register_forward_hook(lambda *_: counts.__setitem__(-1, counts[-1] + 1))
    try:
        for _ in range(iterations):
            counts.append(0)
            engine.train_step()
    finally:
        handle.remove()
    return counts


def test_roll_back_iterations_equal_plain_torch_algorithm_1(tmp_path):
    # Several iterations, so that the real step's kept encoder forward (recorded in the tentative step, replayed
    # after the roll-back) meets non-empty optimizer states and parameters that moved in earlier iterations.
    engine = tiny_engine(tmp_path, hypergradient={"roll_back": True, "alpha": 0.01})
    reference = copy.deepcopy(engine.model)
    optimizers, forwards = None, []
    for _ in range(4):
        forwards += encoder_forwards(engine)
        batch = engine.autoencoder.cur_batch
        optimizers = algorithm_1(reference, batch, lr=1e-2, xi=1e-2, alpha=0.01, roll_back=True, optimizers=optimizers)
    assert forwards == [ROLL_BACK_FORWARDS - 1] * 4  # each real step ran on the kept encoder forward
    for (name, got), (_, want) in zip(engine.model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert_optimizer_states_close(engine.autoencoder.optimizer, optimizers[0])
    assert_optimizer_states_close(engine.codebook.optimizer, optimizers[1])


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_fast_roll_back_is_bit_identical_to_betty_roll_back(tmp_path, norm):
    # FastRollBack's state cache and kept encoder forward against Betty's own roll-back (deep-copied states and a
    # real step with a forward of its own). With BatchNorm the real step must also leave the encoder's running
    # statistics as a recomputed forward would: rewound by the roll-back, then updated once by the forward at the
    # pre-step parameters.
    fast = tiny_engine(tmp_path / "fast", model={"norm": norm}, hypergradient={"roll_back": True})
    plain = tiny_engine(tmp_path / "plain", model={"norm": norm}, hypergradient={"roll_back": True})
    assert fast.autoencoder.fast_roll_back is not None
    plain.autoencoder.fast_roll_back = None
    assert encoder_forwards(fast, 3) == [ROLL_BACK_FORWARDS - 1] * 3
    assert encoder_forwards(plain, 3) == [ROLL_BACK_FORWARDS] * 3
    for (name, got), (_, want) in zip(fast.model.state_dict().items(), plain.model.state_dict().items()):
        assert torch.equal(got, want), name
    for level in ("autoencoder", "codebook"):
        got, want = (getattr(engine, level).optimizer.state_dict() for engine in (fast, plain))
        assert got["param_groups"] == want["param_groups"]
        for key, state in want["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(got["state"][key][name]), torch.as_tensor(value)), (level, key, name)


# ---------------------------------------------------------------------------------------------
# 3. xi = 0 is alternated optimization; the implicit term is linear in xi.


class CallCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        for name, fn in list(jvp_fn_mapping.items()):
            monkeypatch.setitem(jvp_fn_mapping, name, self.wrap(fn))

    def wrap(self, fn):
        def counted(*args):
            self.calls += 1
            return fn(*args)
        return counted


def test_xi_zero_is_huh_alternated_optimization(tmp_path, monkeypatch):
    counter = CallCounter(monkeypatch)
    engine = tiny_engine(tmp_path, hypergradient={"xi": 0.0})
    lower_steps = []
    step = engine.autoencoder.optimizer.step
    monkeypatch.setattr(engine.autoencoder.optimizer, "step", lambda *a, **k: lower_steps.append(1) or step(*a, **k))
    decoder_forwards = []
    engine.model.decoder.register_forward_hook(lambda *_: decoder_forwards.append(1))
    reference = copy.deepcopy(engine.model)
    engine.train_step()

    assert counter.calls == 0  # no finite-difference (or any hypergradient) evaluation
    # No tentative lower step: one step of the encoder-decoder, and one decoder forward, its own (the codebook's
    # step needs only the encoder and the quantizer).
    assert len(lower_steps) == 1 and len(decoder_forwards) == 1

    # Huh Eq. 17-18: a codebook step at the current encoder, then a lower step with the updated codebook.
    batch = engine.codebook.cur_batch
    lower, codebook = enc_dec_parameters(reference), [reference.quantizer.codebook]
    opt_upper, opt_lower = torch.optim.Adam(codebook, lr=1e-2), torch.optim.Adam(lower, lr=1e-2)
    set_grads(codebook, torch.autograd.grad(reference.loss(batch)["loss"], codebook))
    opt_upper.step()
    set_grads(lower, torch.autograd.grad(reference.loss(batch)["loss"], lower))
    opt_lower.step()
    for (name, got), (_, want) in zip(engine.model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def implicit_term(engine, xi):
    return implicit_term_for(engine, [torch.ones_like(p) * 1e-2 for p in engine.autoencoder.trainable_parameters()], xi)


def implicit_term_for(engine, vector, xi):
    """The engine's Eq. 13 term for ``vector`` (v) at this iteration's batch and pre-step parameters."""
    ae, cb = engine.autoencoder, engine.codebook
    context = ae.hypergradient_context(cb)
    context = dataclasses.replace(context, steps=tuple(dataclasses.replace(step, xi=xi) for step in context.steps))
    with context.pure_evaluation():
        return hypergradients.mqvae(vector, context)


def test_implicit_term_scales_linearly_with_xi(tmp_path):
    engine = tiny_engine(tmp_path)
    engine.train_step()
    once, twice = implicit_term(engine, 0.01), implicit_term(engine, 0.02)
    assert once[0].abs().sum() > 0
    torch.testing.assert_close(twice[0], 2 * once[0], rtol=1e-5, atol=1e-9)


def test_a_registered_method_sees_the_context_and_its_term_is_added_to_the_direct_term(tmp_path, monkeypatch):
    seen = []

    def constant(vector, context):
        seen.append((context, [v.clone() for v in vector]))
        return [torch.full_like(u, 0.5) for u in context.upper]

    monkeypatch.setitem(jvp_fn_mapping, "constant", None)
    register_hypergradient("constant", constant)
    with pytest.raises(UserError, match="registered twice"):  # a taken name is not silently replaced
        register_hypergradient("mqvae", constant)
    xi = 0.05
    engine, model = toy_engine(tmp_path, xi, "constant")
    phi0, c0 = model.lower.w.detach().clone(), model.upper.w.detach().clone()
    engine.train_step()
    x = engine.lower.cur_batch[0]

    phi = phi0.clone().requires_grad_()
    post = (phi0 - xi * torch.autograd.grad(toy_loss(phi, c0, x), phi)[0]).requires_grad_()
    c = c0.clone().requires_grad_()
    v, direct = torch.autograd.grad(toy_loss(post, c, x), (post, c))
    torch.testing.assert_close(engine.upper.recorded[0], direct + 0.5, rtol=1e-12, atol=1e-12)

    ((context, vector),) = seen
    assert isinstance(context, HypergradientContext)
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.xi = 1.0
    assert context.xi == pytest.approx(xi, rel=1e-12) and context.alpha == 0.01
    torch.testing.assert_close(vector[0], v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(context.pre_step[0], phi0, rtol=0, atol=0)
    assert context.lower[0] is model.lower.w and context.upper[0] is model.upper.w
    # The closures evaluate L on the iteration's batch at the parameters as they are when called.
    torch.testing.assert_close(context.upper_loss(), toy_loss(model.lower.w, model.upper.w, x), rtol=1e-12, atol=0)
    torch.testing.assert_close(context.loss(), toy_loss(model.lower.w, model.upper.w, x), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# 4. Purity of the perturbed evaluations, for every hypergradient type.


@pytest.mark.parametrize("kind", ["mqvae", "direct", "darts", "sama", "neumann", "cg"])
def test_hypergradient_leaves_parameters_and_buffers_bit_identical(tmp_path, kind):
    engine = tiny_engine(tmp_path, model={"norm": "batch"}, hypergradient={"type": kind})
    engine.train_step()
    ae, cb = engine.autoencoder, engine.codebook
    before = snapshot(engine.model)
    vector = [torch.randn_like(p) for p in ae.trainable_parameters()]
    jvp_fn_mapping[kind](vector, ae, cb, False)
    after = engine.model.state_dict()
    assert before.keys() == after.keys()
    assert any("running_mean" in k for k in before)
    for key in before:
        assert torch.equal(before[key], after[key]), key
