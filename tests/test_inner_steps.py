"""hypergradient.inner_steps (Huh Table 10): alternated optimization with k codebook steps per iteration, the i-th
on the i-th of k equal sub-batches, then one encoder-decoder step on the whole batch, against plain torch."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import float64, interrupt_at, snapshot, tiny_engine, two_levels  # noqa: F401  (float64: a fixture)
from mqvae.io.checkpoint import load_checkpoint
from mqvae.errors import UserError
from problems import base

BETA = 0.25  # helpers.TINY_QUANTIZER's
DIGITS64 = {"name": "digits64", "batch_size": 16}


def alternated(k, **kwargs):
    return {"hypergradient": {"xi": 0.0, "inner_steps": k}, **kwargs}


def quantize(model, z_e):
    """z_e (the encoder's N x D x H x W map) as vectors, and their nearest codes, by hand (squared distance)."""
    codebook = model.quantizer.codebook
    vectors = z_e.movedim(1, -1).reshape(-1, codebook.shape[1])
    return vectors, codebook[torch.cdist(vectors.detach(), codebook.detach()).argmin(1)]


def codebook_loss(model, x):
    """MQ-VAE Eq. 5, d(sg[z_e], z_q): the only term of Eq. 6 with a gradient for the codes under plain STE."""
    z_e, z_q = quantize(model, model.encoder(x))
    return (z_e.detach() - z_q).pow(2).mean()


def encoder_decoder_loss(model, x):
    """L_task + beta * L_commit (Eq. 4, 6), through the straight-through estimator (Eq. 3)."""
    z_map = model.encoder(x)
    z_e, z_q = quantize(model, z_map)
    z_st = (z_e + (z_q - z_e).detach()).reshape(z_map.movedim(1, -1).shape).movedim(-1, 1)
    return F.mse_loss(model.decoder(z_st), x) + BETA * (z_e - z_q.detach()).pow(2).mean()


def huh_table_10(model, batch, k, optimizers):
    """One iteration in plain torch: k Adam steps of the codebook, the i-th on items i, i + k, ... of the batch, each
    at the current encoder; then one Adam step of encoder and decoder on the whole batch with the updated codebook.
    Returns the codebook loss of each inner step, taken before it."""
    opt_codebook, opt_lower = optimizers
    codebook = model.quantizer.codebook
    losses = []
    for i in range(k):
        loss = codebook_loss(model, batch[0][i::k])
        (codebook.grad,) = torch.autograd.grad(loss, [codebook])
        opt_codebook.step()
        losses.append(loss.detach())
    lower = [*model.encoder.parameters(), *model.decoder.parameters()]
    for p, g in zip(lower, torch.autograd.grad(encoder_decoder_loss(model, batch[0]), lower)):
        p.grad = g
    opt_lower.step()
    return losses


@pytest.mark.parametrize("k", [2, 4])
def test_k_codebook_steps_on_sub_batches_then_one_encoder_decoder_step_equal_plain_torch(tmp_path, float64,
                                                                                          monkeypatch, k):
    # Distinct learning rates, so that a codebook step on the wrong sub-batch (or the whole batch), a k ignored,
    # or the encoder-decoder stepping first each move the parameters elsewhere.
    engine = tiny_engine(tmp_path, levels=two_levels(codebook_lr=2e-2, autoencoder_lr=5e-3),
                         data=DIGITS64, **alternated(k))
    averaged = []  # per gradient that Level.optimizer_step averages (data-parallel): whether it is the codebook's
    average_grads = base.distributed.average_grads

    def noted(params):
        averaged.append(params[0] is engine.model.quantizer.codebook)
        average_grads(params)

    monkeypatch.setattr(base.distributed, "average_grads", noted)
    reference = copy.deepcopy(engine.model)
    optimizers = (torch.optim.Adam([reference.quantizer.codebook], lr=2e-2),
                  torch.optim.Adam([*reference.encoder.parameters(), *reference.decoder.parameters()], lr=5e-3))
    iterations = 3
    for _ in range(iterations):
        engine.train_step()
        batch = engine.codebook.cur_batch
        assert batch[0].shape[0] == DIGITS64["batch_size"]  # the encoder-decoder shares the whole batch
        losses = huh_table_10(reference, batch, k, optimizers)
        # The logged codebook term is the mean over the k steps, each on its sub-batch before its step.
        torch.testing.assert_close(engine.codebook.last_stats["codebook"], torch.stack(losses).mean(),
                                   rtol=1e-10, atol=0)
    for (name, got), (_, want) in zip(engine.model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # Adam counted k steps of the codebook per iteration, one of the encoder-decoder, and each went through the
    # level's gradient averaging, codebook first.
    assert [s["step"] for s in engine.codebook.optimizer.state_dict()["state"].values()] == [k * iterations]
    assert averaged == ([True] * k + [False]) * iterations


def test_the_codebook_takes_the_iterations_lr_in_every_inner_step_and_the_schedule_advances_once(tmp_path):
    # The schedule is per iteration (train.iters long): the k steps of one iteration share its lr.
    iters, k, lr = 4, 4, 0.05
    levels = [{**level, "scheduler": "cosine"} for level in two_levels(lr, lr, "sgd")]
    engine = tiny_engine(tmp_path, levels=levels, train={"iters": iters, "log_every": 1}, **alternated(k))
    seen = []
    engine.codebook.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: seen.append(
        optimizer.param_groups[0]["lr"]))
    for _ in range(iters):
        engine.train_step()
    cosine = [lr * 0.5 * (1 + math.cos(math.pi * step / iters)) for step in range(iters)]
    assert seen == pytest.approx([x for x in cosine for _ in range(k)], rel=1e-12)


def test_every_inner_step_counts_towards_the_zero_gradient_warning(tmp_path):
    # codebook_weight 0: nothing in the codebook level's loss moves the codes, a zero gradient at every step.
    k, iters = 4, 3
    engine = tiny_engine(tmp_path, quantizer={"codebook_weight": 0.0}, **alternated(k))
    for _ in range(iters):
        engine.train_step()
    assert engine.codebook.zero_gradient_steps() == k * iters
    assert engine.autoencoder.zero_gradient_steps() == 0


def test_a_resumed_run_continues_bit_for_bit(tmp_path, monkeypatch):
    # The stream (one batch per iteration), the optimizer states (k steps each) and the schedule are the checkpoint's
    # already: nothing of the inner loop needs saving. Dead-code replacement every iteration exercises maintenance.
    settings = dict(quantizer={"replace_freq": 1}, levels=[{**level, "scheduler": "cosine"} for level in two_levels()],
                    train={"iters": 4, "log_every": 1, "checkpoint_every": 2}, **alternated(2))

    def engine(name):
        (tmp_path / name).mkdir()
        built = tiny_engine(tmp_path / name, **settings)
        built.write_config()  # (run.py writes it before training; a checkpoint goes with it)
        return built

    whole = engine("whole")
    with torch.random.fork_rng():
        whole.run()
    killed = engine("killed")
    put_back = interrupt_at(monkeypatch, 3)
    with torch.random.fork_rng(), pytest.raises(KeyboardInterrupt):
        killed.run()
    put_back()
    resumed = engine("resumed")
    with torch.random.fork_rng():
        path = tmp_path / "killed" / "checkpoint.pt"
        resumed.load_state_dict(load_checkpoint(path), str(path))
        assert resumed.global_step == 2
        resumed.run()
    for (name, got), (_, want) in zip(snapshot(resumed.model).items(), snapshot(whole.model).items()):
        assert torch.equal(got, want), name


def test_a_holdout_batch_that_k_does_not_divide_is_one_line(tmp_path):
    # The config checks data.batch_size; a holdout split smaller than it gives a smaller batch (here 9 of the 1500
    # digits).
    levels = two_levels()
    levels[0]["data"] = "holdout"
    with pytest.raises(UserError) as info:
        tiny_engine(tmp_path, levels=levels, data={"name": "digits", "batch_size": 16, "holdout_fraction": 0.006},
                    **alternated(2))
    message = str(info.value)
    assert "\n" not in message and "hypergradient.inner_steps: 2" in message and "'codebook'" in message
