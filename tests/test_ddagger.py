"""MQ-VAE‡ (App. E, ``hypergradient.mutual``) against a plain-torch float64 reference of its iteration.

From one state (phi, theta, C): the encoder-decoder's tentative step and the codebook's hypergradient through it
(MQ-VAE, Eq. 13); that step undone; the codebook's tentative step and the encoder-decoder's hypergradient through
it (MQ-VAE†, Eq. 13 with the roles swapped); that step undone; then both real steps. The reference has switches for
the ways to get this wrong, and the test shows that the engine's run is told apart from each of them.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import (RANDOM_START, assert_same, enc_dec, float64, grads, killed_after_first_save,  # noqa: F401  (float64: a fixture)
                     measured, step, tiny_config, tiny_engine, two_levels)
from test_run import ROOT, TINY
from mqvae.config import config_from_dict, to_dict
from mqvae.errors import UserError

CODEBOOK_LR, AUTOENCODER_LR, ALPHA = 3e-2, 1e-2, 0.01


def central_difference(model, at, pre, vector, loss, wrt, xi, alpha):
    """-xi [grad_wrt L(at + eps v) - grad_wrt L(at - eps v)] / (2 eps), eps = alpha / ||v||, around ``pre``;
    ``at`` is left at ``pre``."""
    eps = alpha / torch.cat([v.reshape(-1) for v in vector]).norm()
    sides = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, p0, v in zip(at, pre, vector):
                p.copy_(p0 + sign * eps * v)
        sides.append(grads(loss(), wrt))
    with torch.no_grad():
        for p, p0 in zip(at, pre):
            p.copy_(p0)
    return [-xi * (plus - minus) / (2 * eps) for plus, minus in zip(*sides)]


def mqvae_ddagger(model, batches, optimizers, terms, mistake=None):
    """One MQ-VAE‡ iteration in plain torch. ``batches``: (the encoder-decoder's, the codebook's). ``mistake``:
    None, or one of "no upper implicit", "no lower implicit", "sequential" (the codebook's tentative step from the
    encoder-decoder's tentative state, not from the shared state), "swapped xi" (each side's implicit term scaled by
    its own lr instead of the other side's)."""
    lower, upper = enc_dec(model), [model.quantizer.codebook]
    opt_lower, opt_upper = optimizers
    b_lower, b_upper = batches
    xi_lower, xi_upper = (CODEBOOK_LR, AUTOENCODER_LR) if mistake == "swapped xi" else (AUTOENCODER_LR, CODEBOOK_LR)

    def loss(batch):
        return lambda: model.loss(batch)["loss"]

    pre_lower, pre_upper = [p.detach().clone() for p in lower], [p.detach().clone() for p in upper]
    state_lower, state_upper = (copy.deepcopy(o.state_dict()) for o in optimizers)
    # The encoder-decoder's tentative step, and the codebook's hypergradient through it (MQ-VAE, Eq. 13).
    step(opt_lower, lower, grads(loss(b_lower)(), lower))
    g = grads(loss(b_upper)(), upper + lower)
    direct_upper, v = g[:1], g[1:]
    post = [p.detach().clone() for p in lower]
    implicit_upper = central_difference(model, lower, pre_lower, v, loss(b_lower), upper, xi_lower, ALPHA)
    if mistake == "sequential":
        with torch.no_grad():
            for p, p1 in zip(lower, post):
                p.copy_(p1)
    else:
        opt_lower.load_state_dict(state_lower)
    if mistake == "no upper implicit":
        implicit_upper = [torch.zeros_like(t) for t in implicit_upper]
    # The codebook's tentative step, and the encoder-decoder's hypergradient through it (MQ-VAE†).
    step(opt_upper, upper, grads(loss(b_upper)(), upper))
    g = grads(loss(b_lower)(), lower + upper)
    direct_lower, w = g[:len(lower)], g[len(lower):]
    implicit_lower = central_difference(model, upper, pre_upper, w, loss(b_upper), lower, xi_upper, ALPHA)
    if mistake == "no lower implicit":
        implicit_lower = [torch.zeros_like(t) for t in implicit_lower]
    opt_upper.load_state_dict(state_upper)
    if mistake == "sequential":  # both real steps from the shared state all the same
        with torch.no_grad():
            for p, p0 in zip(lower, pre_lower):
                p.copy_(p0)
        opt_lower.load_state_dict(state_lower)
    # Both real steps, from (phi, theta, C).
    step(opt_upper, upper, [d + i for d, i in zip(direct_upper, implicit_upper)])
    step(opt_lower, lower, [d + i for d, i in zip(direct_lower, implicit_lower)])
    terms.append({"codebook": (direct_upper, implicit_upper), "autoencoder": (direct_lower, implicit_lower)})


def ddagger_engine(tmp_path, optimizer, **hypergradient):
    levels = two_levels(codebook_lr=CODEBOOK_LR, autoencoder_lr=AUTOENCODER_LR, optimizer=optimizer)
    return tiny_engine(tmp_path, levels=levels, data={"name": "digits64", "batch_size": 16}, quantizer=RANDOM_START,
                       hypergradient={"mutual": True, "alpha": ALPHA, **hypergradient})


def reference_run(model, batches, optimizer, mistake=None):
    """The reference's iterations on a copy of ``model``: (model, optimizers, terms per iteration)."""
    model = copy.deepcopy(model)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    optimizers = (cls(enc_dec(model), lr=AUTOENCODER_LR), cls([model.quantizer.codebook], lr=CODEBOOK_LR))
    terms = []
    for pair in batches:
        mqvae_ddagger(model, pair, optimizers, terms, mistake)
    return model, optimizers, terms


def engine_iterations(engine, n):
    """Run ``n`` iterations; the batches each side took and each side's (direct, implicit) terms, per iteration."""
    batches, terms = [], []
    for _ in range(n):
        engine.train_step()
        batches.append((engine.autoencoder.cur_batch, engine.codebook.cur_batch))
        terms.append({name: tuple([t.clone() for t in part] for part in getattr(engine, name)._terms)
                      for name in ("codebook", "autoencoder")})
    return batches, terms


def assert_same_run(engine, engine_terms, reference):
    """Every parameter and optimizer state to 1e-10, and each side's direct and implicit terms to 1e-7 relative."""
    model, (opt_lower, opt_upper), terms = reference
    for (name, got), (_, want) in zip(engine.model.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=lambda m: f"parameter {name}: {m}")
    for level, optimizer in ((engine.autoencoder, opt_lower), (engine.codebook, opt_upper)):
        got, want = level.optimizer.state_dict()["state"], optimizer.state_dict()["state"]
        assert got.keys() == want.keys(), level.name
        for key in got:
            for name in want[key]:
                torch.testing.assert_close(torch.as_tensor(got[key][name]), torch.as_tensor(want[key][name]), rtol=0, check_dtype=False,
                                           atol=1e-10, msg=lambda m: f"{level.name} optimizer state {name}: {m}")
    for i, (got, want) in enumerate(zip(engine_terms, terms)):
        for side in ("codebook", "autoencoder"):
            for kind, a, b in zip(("direct", "implicit"), got[side], want[side]):
                a, b = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
                assert b.norm() > 0, f"iteration {i + 1}: the reference's {side} {kind} term is zero"
                error = ((a - b).norm() / b.norm()).item()
                assert error < 1e-7, f"iteration {i + 1}: {side} {kind} term off by {error:.1e} (relative)"


@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_mutual_iterations_equal_the_plain_torch_reference(tmp_path, float64, optimizer, iterations):
    engine = ddagger_engine(tmp_path, optimizer)
    start = copy.deepcopy(engine.model)
    assert engine.model.quantizer.codebook.dtype == torch.float64
    batches, terms = engine_iterations(engine, iterations)
    assert_same_run(engine, terms, reference_run(start, batches, optimizer))
    if iterations > 1:
        return
    # Each mistake is caught. Measured: by the parameters (the encoder's first weight, or for the codebook's dropped
    # implicit term under SGD the codebook), except the codebook's dropped implicit term under Adam, whose first step
    # (lr m / sqrt(v), nearly lr sign(g)) moves the codebook alike to 1e-10: its exp_avg catches that one.
    for mistake in ("no upper implicit", "no lower implicit", "sequential", "swapped xi"):
        with pytest.raises(AssertionError):
            assert_same_run(engine, terms, reference_run(start, batches, optimizer, mistake))


def test_mutual_with_holdout_data_on_one_side_equals_the_reference(tmp_path, float64):
    # The codebook draws its own batches from the held-out split; each side's Eq. 13 differentiates its own loss on its
    # own batch: the codebook's implicit term the encoder-decoder's loss on the training batch, and the other way round.
    levels = two_levels(codebook_lr=CODEBOOK_LR, autoencoder_lr=AUTOENCODER_LR, optimizer="adam")
    levels[0]["data"] = "holdout"
    engine = tiny_engine(tmp_path, levels=levels, data={"name": "digits64", "batch_size": 16}, quantizer=RANDOM_START,
                         hypergradient={"mutual": True, "alpha": ALPHA})
    start = copy.deepcopy(engine.model)
    batches, terms = engine_iterations(engine, 2)
    assert all(not torch.equal(lower[0], upper[0]) for lower, upper in batches)
    assert_same_run(engine, terms, reference_run(start, batches, "adam"))


def test_each_xi_follows_the_other_sides_schedule(tmp_path):
    levels = two_levels(codebook_lr=CODEBOOK_LR, autoencoder_lr=AUTOENCODER_LR)
    for level in levels:
        level.update(scheduler="warmup_cosine", warmup_ratio=0.5)
    engine = tiny_engine(tmp_path, levels=levels, quantizer=RANDOM_START, hypergradient={"mutual": True},
                         train={"iters": 4, "log_every": 1})
    seen = []
    for _ in range(3):
        lrs = [level.optimizer.param_groups[0]["lr"] for level in (engine.autoencoder, engine.codebook)]
        engine.train_step()
        seen.append(([engine.autoencoder.xi, engine.codebook.xi], lrs))
    for xis, lrs in seen:
        assert xis == pytest.approx(lrs)
    assert seen[0][1] != seen[1][1]  # the schedule moved


@pytest.mark.parametrize("change, message", [
    ({"hypergradient": {"mutual": True, "roll_back": True}}, "roll_back: with mutual: true"),
    ({"hypergradient": {"mutual": True, "xi": 0}}, "mutual: needs xi > 0"),
    ({"hypergradient": {"mutual": True}, "levels": "three"}, "defined for two levels"),
])
def test_what_mutual_look_ahead_cannot_mean_is_one_line(change, message):
    data = to_dict(tiny_config())
    data["hypergradient"].update(change["hypergradient"])
    if change.get("levels") == "three":
        data["levels"][0]["lower"] = ["autoencoder", "beta"]
        data["levels"].append({**data["levels"][1], "name": "beta", "problem": "CommitmentWeight", "lower": []})
    with pytest.raises(UserError, match=message) as caught:
        config_from_dict(data, "<test>")
    assert "\n" not in str(caught.value)


@pytest.mark.long("three processes train 8 iterations of MQ-VAE‡ each (a killed run, its resume, the reference)")
def test_a_killed_mutual_run_resumes_exactly(tmp_path):
    args = ["configs/digits/mqvae_ddagger.yaml", *TINY, "--set", "train.iters=8", "--set", "train.checkpoint_every=4",
            "--set", "train.eval_every=0"]
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    died = subprocess.run([sys.executable, "-c", killed_after_first_save([*args, "--out", killed])], cwd=ROOT,
                          capture_output=True, timeout=600, env=env)
    assert died.returncode == -signal.SIGKILL and (killed / "checkpoint.pt").exists()
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 4
    for command in (["--resume", str(killed)], [*args, "--out", str(reference)]):
        result = subprocess.run([sys.executable, "run.py", *command], cwd=ROOT, capture_output=True, text=True,
                                timeout=600, env=env)
        assert result.returncode == 0, result.stderr
    assert measured(killed) == measured(reference)
    assert any("autoencoder.implicit_ratio" in r and "codebook.implicit_ratio" in r for r in measured(killed))
    got, want = (torch.load(f / "checkpoint.pt", weights_only=True) for f in (killed, reference))
    for part in ("levels", "optimizers", "schedulers", "progress"):
        assert_same(got[part], want[part], part)
