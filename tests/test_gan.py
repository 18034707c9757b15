"""MQ-GAN's adversarial level and image losses (MQ-VAE App. G): the hinge loss and the adaptive weight against hand
formulas and finite differences in float64, disc_start, the perceptual loss through a stand-in network, and the
one line a run without LPIPS's weights gets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import run
from engines.experiment import build_engine
from mqvae.nn.gan import adaptive_weight, hinge_loss
from helpers import (PLAIN, assert_same_checkpoints, float64, killed_and_resumed, measured,  # noqa: F401
                     stand_in_lpips_vgg, tiny_config, two_levels)  # (float64: a fixture)

ROOT = Path(__file__).resolve().parents[1]
# configs/digits/mqgan.yaml at a test's size: the discriminator on from iteration 3.
SMALL_MQGAN = ["configs/digits/mqgan.yaml", "--set", "model.hidden_channels=8", "--set", "model.ch_mult=[1,2,2]",
               "--set", "model.norm_groups=4", "--set", "quantizer.num_codes=16", "--set", "quantizer.dim=4",
               "--set", "quantizer.codebook_mlp=[8]", "--set", "levels.discriminator.params.disc_start=2",
               "--set", "levels.discriminator.params.filters=4", "--set", "data.batch_size=8",
               "--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "device=cpu",
               "--set", "eval.image_quality=off"]


def discriminator(disc_start=0, disc_weight=1.0, norm="none"):
    return {"name": "discriminator", "problem": "Discriminator", "optimizer": "sgd", "lr": 0.05, **PLAIN,
            "params": {"disc_start": disc_start, "disc_weight": disc_weight, "filters": 4, "layers": 1, "norm": norm}}


def gan_config(disc_start=0, disc_weight=1.0, with_discriminator=True, **top):
    levels = two_levels(optimizer="sgd") + ([discriminator(disc_start, disc_weight)] if with_discriminator else [])
    return tiny_config(levels=levels, quantizer={"kmeans_init": False, "kmeans_warmup": 0},
                       loss={"reconstruction": "l1"}, **top)


# ---------------------------------------------------------------------------------------------
# The formulas.

def test_hinge_loss_is_the_hand_formula():
    real = torch.tensor([2.0, 0.5, -1.0], dtype=torch.float64)
    fake = torch.tensor([-2.0, 0.3, 1.5], dtype=torch.float64)
    # relu(1 - real) = 0, 0.5, 2; relu(1 + fake) = 0, 1.3, 2.5
    assert hinge_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.8 / 3), rel=1e-14)


def test_adaptive_weight_is_the_clamped_norm_ratio():
    nll, gan = torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([0.0, 0.5], dtype=torch.float64)
    assert adaptive_weight(nll, gan).item() == pytest.approx(5.0 / (0.5 + 1e-4), rel=1e-14)
    assert adaptive_weight(nll, torch.zeros(2, dtype=torch.float64)).item() == 1e4  # 5 / 1e-4, clamped


def _finite_difference_gradient(loss_of, weight, h=1e-6):
    grad = torch.zeros_like(weight)
    with torch.no_grad():
        for i in range(weight.numel()):
            flat = weight.view(-1)
            keep = flat[i].item()
            flat[i] = keep + h
            up = loss_of().item()
            flat[i] = keep - h
            down = loss_of().item()
            flat[i] = keep
            grad.view(-1)[i] = (up - down) / (2 * h)
    return grad


def test_the_generator_term_against_finite_differences_in_float64(tmp_path, float64):
    cfg = gan_config(disc_weight=0.7)
    cfg.data.name = "digits64"
    engine = build_engine(cfg, tmp_path)
    model = engine.model
    level = next(p for p in engine.problems if p.name == "autoencoder")
    disc = next(p for p in engine.problems if p.name == "discriminator")
    disc.begin_iteration(1)
    x = engine.datasets.train[:8][0]
    batch = (x, torch.zeros(8, dtype=torch.long))
    terms = level.loss_terms(batch)
    D, last = disc.module, model.last_layer()

    def nll():
        return F.l1_loss(model(x).output, x)

    def gan():
        return -D(model(x).output).mean()

    # The total: Eq. 6 plus d_weight * disc_weight * gan, with d_weight a constant (detached).
    quant = model(x).quant.losses
    total = nll() + 0.25 * quant["commitment"] + quant["codebook"] + terms["d_weight"].item() * 0.7 * gan()
    assert terms["loss"].item() == pytest.approx(total.item(), rel=1e-12)
    params = level.trainable_parameters()
    got, want_grads = (torch.autograd.grad(loss, params) for loss in (terms["loss"], total))
    for g, w in zip(got, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    assert terms["gan"].item() == pytest.approx(gan().item(), rel=1e-12)
    # The adaptive weight, from gradients at the last layer by central differences (not autograd).
    g_nll, g_gan = (_finite_difference_gradient(f, last) for f in (nll, gan))
    want = g_nll.norm() / (g_gan.norm() + 1e-4)
    assert terms["d_weight"].item() == pytest.approx(want.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# disc_start: no discriminator step and no GAN term up to it, both after.

def _train(cfg, tmp_path, iters):
    cfg.train.iters = iters
    tmp_path.mkdir()
    engine = build_engine(cfg, tmp_path)
    initial = {p.name: [t.detach().clone() for t in p.module.parameters()] for p in engine.problems}
    engine.run()
    return engine, initial


def test_nothing_adversarial_happens_before_disc_start_and_both_after(tmp_path):
    plain, _ = _train(gan_config(with_discriminator=False), tmp_path / "plain", 3)
    gan, initial = _train(gan_config(disc_start=3), tmp_path / "gan", 3)
    levels = {p.name: p for p in gan.problems}
    # Up to disc_start: the network trains as without the level, and the discriminator has not moved.
    for p in plain.problems:
        for a, b in zip(p.module.parameters(), levels[p.name].module.parameters()):
            assert torch.equal(a, b), p.name
    for a, b in zip(levels["discriminator"].module.parameters(), initial["discriminator"]):
        assert torch.equal(a, b)
    assert "gan" not in levels["autoencoder"].last_stats and not levels["discriminator"].last_stats
    # After it: both.
    gan.cfg.train.iters = 4
    gan.run()
    assert not all(torch.equal(a, b) for a, b in zip(levels["discriminator"].module.parameters(),
                                                       initial["discriminator"]))
    for name in ("autoencoder", "codebook"):
        assert "gan" in levels[name].last_stats and levels[name].last_stats["d_weight"] > 0, name
    plain.cfg.train.iters = 4
    plain.run()
    assert not all(torch.equal(a, b) for a, b in zip(plain.problems[1].module.parameters(),
                                                       levels["autoencoder"].module.parameters()))
    # The discriminator's schedule spans the steps it takes.
    assert levels["discriminator"].scheduled_steps(10, levels["discriminator"].params) == 7


# ---------------------------------------------------------------------------------------------
# The perceptual loss: LPIPS-VGG through torchmetrics' network, here with a stand-in backbone.

def test_the_perceptual_term_is_lpips_by_hand(tmp_path, monkeypatch):
    network = stand_in_lpips_vgg(monkeypatch)
    cfg = tiny_config(quantizer={"kmeans_init": False, "kmeans_warmup": 0},
                      loss={"reconstruction": "l1", "perceptual_weight": 0.5})
    engine = build_engine(cfg, tmp_path)
    model = engine.model
    x = engine.datasets.train[:4][0]
    terms = model.loss((x, torch.zeros(4, dtype=torch.long)))
    output = terms["_out"].output

    def features(images):  # grey to RGB, [0, 1] to [-1, 1], LPIPS's scaling layer, the backbone
        images = (2 * images.expand(-1, 3, -1, -1) - 1 - network.scaling_layer.shift) / network.scaling_layer.scale
        return network.net(images)

    distance = 0
    for lin, a, b in zip(network.lins, features(output), features(x)):
        a = a / torch.sqrt(1e-8 + (a ** 2).sum(1, keepdim=True))
        b = b / torch.sqrt(1e-8 + (b ** 2).sum(1, keepdim=True))
        w = lin.model[-1].weight.reshape(1, -1, 1, 1)
        distance = distance + (w * (a - b) ** 2).sum(1).mean((1, 2))
    assert terms["perceptual"].item() == pytest.approx(distance.mean().item(), rel=1e-5)
    assert terms["reconstruction"].item() == pytest.approx(F.l1_loss(output, x).item(), rel=1e-6)
    assert terms["task"].item() == pytest.approx(terms["reconstruction"].item() + 0.5 * terms["perceptual"].item(),
                                                 rel=1e-6)
    # Frozen, outside the levels' parameters and the checkpoint, and its gradient reaches the decoder.
    assert not any(p.requires_grad for p in network.parameters())
    assert not any(k.startswith("perceptual") for k in model.state_dict())
    grad = torch.autograd.grad(terms["perceptual"], model.decoder.last_layer)[0]
    assert grad.abs().sum() > 0


def test_without_vgg_weights_a_run_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    out = tmp_path / "run"
    code = run.main(["configs/digits/vqvae.yaml", "--set", "loss.perceptual_weight=1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1, err
    assert "loss.perceptual_weight: 1.0 needs LPIPS's VGG-16" in err and "vgg16-" in err
    assert str(tmp_path / "empty_hub" / "checkpoints") in err
    # (the folder's lock, as every run leaves it, and nothing else)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


@pytest.mark.parametrize("loss", [{"reconstruction": "l1"}, {"perceptual_weight": 1.0}])
def test_image_losses_on_a_classifier_are_one_line(loss):
    from mqvae.errors import UserError
    from mqvae.method.models import task_for

    cfg = tiny_config(model={"kind": "resnet18"}, loss=loss)
    with pytest.raises(UserError, match="not to reconstruct images"):
        task_for(cfg)


# ---------------------------------------------------------------------------------------------
# configs/digits/mqgan.yaml: a run killed by SIGKILL after disc_start resumes exactly.

def test_mqgan_killed_after_disc_start_resumes_exactly(tmp_path):
    killed, reference = killed_and_resumed([*SMALL_MQGAN, "--set", "train.iters=6", "--set", "train.checkpoint_every=4"],
                                           tmp_path)
    assert measured(killed) == measured(reference)
    assert any("discriminator.loss" in r for r in measured(killed)) and any("autoencoder.gan" in r for r in measured(killed))
    assert_same_checkpoints(killed, reference)
