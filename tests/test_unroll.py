"""k-step unrolls (``hypergradient.unroll_steps``, MQ-VAE §4.2: "multiple steps can be unrolled").

The lower level takes k tentative steps on k batches, and the upper level's hypergradient looks through all of them:
the direct term at the k-th iterate, the implicit term by Eq. 13's central difference at each step, recursively
(``mqvae.method.hypergradients.mqvae``). Checked against autograd through k SGD steps on a smooth problem (the
finite-difference error stated there), against the recursion written in plain torch on the tiny VQ model in float64
(to 1e-10), with and without roll-back, and for exact resume from a checkpoint taken in the middle of a window.
"""

from __future__ import annotations

import copy

import pytest
import torch

import run
from engines.build import level_graph, level_steps
from engines.experiment import build_engine
from helpers import (RANDOM_START, assert_same, enc_dec, float64, grads, interrupt_at,  # noqa: F401  (float64: a fixture)
                     measured, step, tiny_config, tiny_engine, two_levels)
from mqvae.config import config_from_dict, to_dict
from mqvae.errors import UserError
from problems import AutoEncoder, register_problem
from test_bilevel import relative_error, toy_engine, toy_loss
from test_run import TINY

ALPHA = 0.01


# ---------------------------------------------------------------------------------------------
# 1. The smooth toy problem of test_bilevel: the engine's hypergradient through k SGD steps equals autograd's
#    d/dC L_k(w_k(C), C), w_j = w_{j-1} - xi grad_w L_j(w_{j-1}, C), to the central difference's error.


def autograd_through_steps(phi0, c0, batches, xi):
    phi, c = phi0.clone().requires_grad_(), c0.clone().requires_grad_()
    w = phi
    for x in batches:
        (g,) = torch.autograd.grad(toy_loss(w, c, x), w, create_graph=True)
        w = w - xi * g
    (hyper,) = torch.autograd.grad(toy_loss(w, c, batches[-1]), c)
    return hyper


def fd_recursion(phi0, c0, batches, xi, mistake=None):
    """The recursion by hand; ``mistake``: "last step only" (the implicit term through the k-th step alone, what
    Betty's private _unroll_steps gave), "no curvature" (v carried to earlier steps unchanged)."""
    c = c0.clone().requires_grad_()
    ws = [phi0.clone()]
    for x in batches:
        w = ws[-1].clone().requires_grad_()
        ws.append((w - xi * torch.autograd.grad(toy_loss(w, c, x), w)[0]).detach())
    w = ws[-1].clone().requires_grad_()
    v, hyper = torch.autograd.grad(toy_loss(w, c, batches[-1]), (w, c))
    for j in reversed(range(len(batches))):
        if mistake == "last step only" and j < len(batches) - 1:
            break
        eps = ALPHA / v.norm()
        sides = []
        for sign in (1, -1):
            w = (ws[j] + sign * eps * v).requires_grad_()
            sides.append(torch.autograd.grad(toy_loss(w, c, batches[j]), (c, w)))
        hyper = hyper - xi * (sides[0][0] - sides[1][0]) / (2 * eps)
        if mistake != "no curvature":
            v = v - xi * (sides[0][1] - sides[1][1]) / (2 * eps)
    return hyper


def recorded_batches(engine, k):
    """Run k iterations (one window); the batch of each lower step."""
    batches = []
    for _ in range(k):
        engine.train_step()
        batches.append(engine.lower.cur_batch[0].clone())
    return batches


# The central difference's error, measured on this problem (alpha 0.01): relative 5e-7 to 1.6e-6 for k = 1, 2, 3 and
# xi 0.05 and 0.2; the bound below leaves room. The wrong recursions are off by 1e-2 or more.
FD_ERROR = 2e-5


@pytest.mark.parametrize("xi", [0.05, 0.2])
@pytest.mark.parametrize("k", [2, 3])
def test_the_hypergradient_equals_autograd_through_k_sgd_steps(tmp_path, k, xi):
    engine, model = toy_engine(tmp_path, xi, batch_size=4, unroll_steps=k)
    phi0, c0 = model.lower.w.detach().clone(), model.upper.w.detach().clone()
    batches = recorded_batches(engine, k)
    assert not any(torch.equal(batches[0], b) for b in batches[1:])  # k batches, not one
    reference = autograd_through_steps(phi0, c0, batches, xi)
    produced = engine.upper.recorded[0]
    assert relative_error(produced, reference) < FD_ERROR
    assert relative_error(fd_recursion(phi0, c0, batches, xi), reference) < FD_ERROR
    for mistake in ("last step only", "no curvature"):
        assert relative_error(fd_recursion(phi0, c0, batches, xi, mistake), reference) > 50 * FD_ERROR, mistake
    # The upper level stepped once, after the k-th step; the lower level kept its k steps (no roll-back).
    assert len(engine.upper.recorded) == 1 and engine.upper._count == 1
    w = phi0.clone()
    for x in batches:
        w = w.requires_grad_()
        w = (w - xi * torch.autograd.grad(toy_loss(w, c0, x), w)[0]).detach()
    torch.testing.assert_close(model.lower.w.detach(), w, rtol=0, atol=1e-12)


def test_roll_back_undoes_the_k_steps_and_redoes_them_with_the_updated_upper_level(tmp_path):
    k, xi = 3, 0.1
    engine, model = toy_engine(tmp_path, xi, batch_size=4, unroll_steps=k, roll_back=True)
    phi0 = model.lower.w.detach().clone()
    batches = recorded_batches(engine, k)
    c1 = model.upper.w.detach().clone()
    w = phi0.clone()
    for x in batches:  # the real steps, from the window's start, with the updated upper parameters
        w = w.requires_grad_()
        w = (w - xi * torch.autograd.grad(toy_loss(w, c1, x), w)[0]).detach()
    torch.testing.assert_close(model.lower.w.detach(), w, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 2. The tiny VQ model in float64: k iterations of the engine equal the recursion in plain torch, every parameter and
#    optimizer state to 1e-10 (the finite differences see through the stop-gradients, so autograd is no reference
#    here: the same formula, written independently, is).

LOWER_LR, UPPER_LR = 1e-2, 3e-2


def set_to(params, values):
    with torch.no_grad():
        for p, value in zip(params, values):
            p.copy_(value)


def reference_window(model, batches, optimizers, roll_back):
    """One window in plain torch: k lower steps, the codebook's step on direct + the recursion, and with roll-back
    the k steps redone from the window's start."""
    lower, upper = enc_dec(model), [model.quantizer.codebook]
    opt_lower, opt_upper = optimizers
    start, start_state = [p.detach().clone() for p in lower], copy.deepcopy(opt_lower.state_dict())

    def loss(batch):
        return model.loss(batch)["loss"]

    pre = []
    for batch in batches:
        pre.append([p.detach().clone() for p in lower])
        step(opt_lower, lower, grads(loss(batch), lower))
    post = [p.detach().clone() for p in lower]
    g = grads(loss(batches[-1]), upper + lower)
    hyper, v = g[:1], g[1:]
    for j in reversed(range(len(batches))):
        eps = ALPHA / torch.cat([t.reshape(-1) for t in v]).norm()
        sides = []
        for sign in (1, -1):
            set_to(lower, [w + sign * eps * t for w, t in zip(pre[j], v)])
            sides.append(grads(loss(batches[j]), upper + lower))
        diff = [(a - b) / (2 * eps) for a, b in zip(*sides)]
        hyper = [h - LOWER_LR * d for h, d in zip(hyper, diff[:1])]
        v = [t - LOWER_LR * d for t, d in zip(v, diff[1:])]
    set_to(lower, post)
    step(opt_upper, upper, hyper)
    if roll_back:
        set_to(lower, start)
        opt_lower.load_state_dict(start_state)
        for batch in batches:
            step(opt_lower, lower, grads(loss(batch), lower))


def unroll_engine(tmp_path, optimizer, k, **hypergradient):
    levels = two_levels(codebook_lr=UPPER_LR, autoencoder_lr=LOWER_LR, optimizer=optimizer)
    return tiny_engine(tmp_path, levels=levels, data={"name": "digits64", "batch_size": 16}, quantizer=RANDOM_START,
                       hypergradient={"alpha": ALPHA, "unroll_steps": k, **hypergradient})


def assert_close_states(engine, model, optimizers):
    for (name, got), (_, want) in zip(engine.model.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=lambda m: f"parameter {name}: {m}")
    for level, optimizer in zip((engine.autoencoder, engine.codebook), optimizers):
        got, want = level.optimizer.state_dict()["state"], optimizer.state_dict()["state"]
        assert got.keys() == want.keys(), level.name
        for key in got:
            for name in want[key]:
                torch.testing.assert_close(torch.as_tensor(got[key][name]), torch.as_tensor(want[key][name]), rtol=0,
                                           atol=1e-10, check_dtype=False, msg=lambda m: f"{level.name} {name}: {m}")


@pytest.mark.parametrize("k, optimizer, roll_back", [(2, "sgd", False), (3, "adam", False), (2, "adam", True)])
def test_two_windows_equal_the_recursion_in_plain_torch(tmp_path, float64, k, optimizer, roll_back):
    engine = unroll_engine(tmp_path, optimizer, k, roll_back=roll_back)
    model = copy.deepcopy(engine.model)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    optimizers = (cls(enc_dec(model), lr=LOWER_LR), cls([model.quantizer.codebook], lr=UPPER_LR))
    for _ in range(2):
        batches = []
        for _ in range(k):
            engine.train_step()
            batches.append(engine.autoencoder.cur_batch)
        reference_window(model, batches, optimizers, roll_back)
        assert_close_states(engine, model, optimizers)
    # The codebook stepped once per window: its schedule is iters / k steps long.
    cfg = tiny_config(hypergradient={"unroll_steps": k}, train={"iters": 12})
    assert level_steps(cfg, level_graph(cfg)[1]) == {"codebook": 12 // k, "autoencoder": 12}


# ---------------------------------------------------------------------------------------------
# 3. Exact resume from a checkpoint taken inside a window.

ARGS = ["configs/digits/mqvae.yaml", *TINY, "--set", "train.iters=7", "--set", "train.checkpoint_every=2",
        "--set", "train.eval_every=0", "--set", "threads=1", "--set", "hypergradient.unroll_steps=3"]


@pytest.mark.parametrize("roll_back", [False, True])
def test_a_run_stopped_inside_a_window_resumes_exactly(tmp_path, monkeypatch, roll_back):
    args = [*ARGS, "--set", f"hypergradient.roll_back={str(roll_back).lower()}"]
    stopped, reference = tmp_path / "stopped", tmp_path / "reference"
    assert run.main([*args, "--out", str(reference)]) == 0
    restore = interrupt_at(monkeypatch, 5)  # the last checkpoint is at 4: one step into the second window of 3
    assert run.main([*args, "--out", str(stopped)]) == 130
    restore()
    saved = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 4 and len(saved["progress"]["autoencoder"]["unroll"]) == 1
    assert (saved["progress"]["autoencoder"]["roll_back_state"] is not None) == roll_back
    assert run.main(["--resume", str(stopped)]) == 0
    assert measured(stopped) == measured(reference)
    got, want = (torch.load(f / "checkpoint.pt", weights_only=True) for f in (stopped, reference))
    for part in ("levels", "optimizers", "schedulers", "progress"):
        assert_same(got[part], want[part], part)


# ---------------------------------------------------------------------------------------------
# 4. What the key cannot mean is one line at load; Betty's private route is refused.


@pytest.mark.parametrize("change, message", [
    ({"xi": 0}, "needs xi > 0"),
    ({"mutual": True}, "with mutual: true"),
    ({"type": "darts"}, "looks through the latest tentative step only"),
    ({"accumulate": True}, "grad_accumulation > 1"),
    ({"chain": True}, "both above and below"),
])
def test_what_unroll_steps_cannot_mean_is_one_line(change, message):
    data = to_dict(tiny_config())
    data["hypergradient"]["unroll_steps"] = 2
    if change.pop("accumulate", False):
        data["levels"][1]["grad_accumulation"] = 2
    if change.pop("chain", False):
        data["levels"][1]["lower"] = ["beta"]
        data["levels"].append({**data["levels"][1], "name": "beta", "problem": "CommitmentWeight", "lower": []})
    data["hypergradient"].update(change)
    with pytest.raises(UserError, match=message) as caught:
        config_from_dict(data, "<test>")
    assert "\n" not in str(caught.value)


@register_problem
class UnrollsPrivately(AutoEncoder):
    """A level that sets Betty's private attribute, as a user did before the config key existed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unroll_steps = 2


def test_betty_private_unroll_steps_is_refused_in_one_line(tmp_path):
    levels = two_levels()
    levels[1]["problem"] = "UnrollsPrivately"
    cfg = tiny_config(levels=levels)
    with pytest.raises(UserError, match="private _unroll_steps = 2; set hypergradient.unroll_steps") as caught:
        build_engine(cfg, tmp_path)
    assert "\n" not in str(caught.value)
