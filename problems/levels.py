"""The level kinds of MQ-VAE and its baselines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mqvae.config import spec
from mqvae.errors import UserError
from mqvae.nn.gan import PatchDiscriminator, adaptive_weight, hinge_loss
from mqvae.registry import PROBLEMS
from mqvae.runtime import distributed

from .base import Level


class VQVAE(Level):
    """Joint training of encoder, decoder and codebook on Eq. 6: the VQ-VAE baseline as a one-level problem."""

    @dataclass
    class Params:
        # The learning rate of the quantizer's parameter group (the codebook, a learned affine map's s and t, a
        # hyper-net codebook's MLP), on the level's optimizer and schedule; null: the level's lr. Set to an MQ-VAE
        # config's codebook lr, this VQ-VAE gives the codebook the update MQ-VAE's upper level gives it at xi = 0
        # (tests/test_ablation.py): the ablation that tells the hypergradient from the codebook's learning rate.
        codebook_lr: Optional[float] = spec(None, above=0.0)

    @classmethod
    def module_of(cls, model, params):
        return model

    def quantizer_lr(self) -> float:
        return self.level_cfg.lr if self.params.codebook_lr is None else self.params.codebook_lr


class AutoEncoder(Level):
    """MQ-VAE's lower level: the encoder phi and decoder theta (Eq. 7)."""

    @classmethod
    def module_of(cls, model, params):
        return nn.ModuleDict({"encoder": model.encoder, "decoder": model.decoder})


class Encoder(Level):
    """The encoder phi alone: with ``Decoder`` the two halves of MQ-VAE's lower level as levels of their own
    (configs/digits/mqvae_chain.yaml)."""

    @classmethod
    def module_of(cls, model, params):
        return model.encoder


class Decoder(Level):
    """The decoder theta alone (see ``Encoder``)."""

    @classmethod
    def module_of(cls, model, params):
        return model.decoder


class Classifier(AutoEncoder):
    """The classification task's lower level: backbone halves and head around the quantizer (Huh §5.1)."""


class Codebook(Level):
    """MQ-VAE's upper level: the codebook C (Eq. 8), the affine parameters when they are learned, and the MLP of a
    hyper-net codebook (``quantizer.codebook_mlp``)."""

    @classmethod
    def module_of(cls, model, params):
        return model.quantizer

    def step_terms(self, batch) -> dict:
        # Alternated optimization (xi = 0, Huh §4.2): the codebook level steps first, on its direct gradient, and
        # no level differentiates through it (it has no level below it). With a plain straight-through estimator
        # that gradient is the gradient of the quantizer's part of Eq. 6 alone, so the step runs the encoder and the
        # quantizer and skips the decoder. Its logged ``loss`` is then that part of Eq. 6 (commitment and codebook
        # terms), not the task loss. A subclass with a loss of its own (loss_terms) steps on that.
        # Measured saving: 12-15 % of an alt step on digits (batch 64), 10-13 % at the paper shape (batch 32).
        if not self._children and self._training and self._codebook_needs_encoder_only():
            return self.model.quantization_terms(batch)
        return super().step_terms(batch)


class CommitmentWeight(Level):
    """A third level that learns the commitment weight beta of the levels below it (Eq. 6).

    beta = min_beta + softplus(rho) stays above min_beta. Its loss is the task loss on held-out data at the
    current lower parameters; beta reaches it only through the lower level's response, so its whole gradient
    is the hypergradient through the lower level's step. That one-step response asks for a smaller beta at every
    step (a short-horizon bias, Wu et al. 2018): without a floor beta goes to 0, and with nothing tying z_e to the
    codes the run diverges (README, "Adding a level").
    """

    @dataclass
    class Params:
        # beta at the start; null: the quantizer's beta (quantizer.beta).
        initial_beta: Optional[float] = spec(None, above=0.0)
        # The floor beta stays above (0: none).
        min_beta: float = spec(0.0, min=0.0)

    learned_scalars = ("beta",)

    @classmethod
    def module_of(cls, model, params):
        if model.quantizer.loss_weights().get("commitment") is None:
            raise UserError("levels: CommitmentWeight learns the commitment weight beta, but this quantizer has no "
                            "commitment term (quantizer.kind: gumbel); use quantizer.kind: vq")
        beta = model.quantizer.loss_weights()["commitment"] if params.initial_beta is None else params.initial_beta
        if beta <= params.min_beta:
            raise UserError(f"levels: CommitmentWeight starts at beta {beta}, which is not above its floor "
                            f"params.min_beta {params.min_beta}; lower min_beta or raise initial_beta")
        # Inverse softplus, so the level starts at the configured beta.
        module = nn.Module()
        module.rho = nn.Parameter(torch.tensor(float(beta - params.min_beta)).expm1().log())
        return module

    def beta(self) -> torch.Tensor:
        return self.params.min_beta + F.softplus(self.module.rho)

    def provided_weights(self) -> dict:
        return {"commitment": self.beta()}

    def loss_terms(self, batch) -> dict:
        terms = self.model.loss(batch, weights=self.provided_weights())
        return {**terms, "loss": terms["task"], "beta": self.beta()}


class Prior(Level):
    """A PixelCNN prior on the frozen codes of a finished run (``prior.run``; MQ-VAE Fig. 3): it trains the
    ``GatedPixelCNN`` of the engine's ``mqvae.method.prior.PriorModel`` on the cross-entropy of the code logits, with
    the run's encoder, codebook and decoder frozen."""

    trains_prior = True

    @classmethod
    def module_of(cls, model, params):
        return model.pixelcnn

    def loss_terms(self, batch) -> dict:
        return self.model.loss(batch)


class Discriminator(Level):
    """VQ-GAN's PatchGAN discriminator (Esser et al. 2021) as a level of its own, as MQ-GAN has it (MQ-VAE App. G;
    the authors' released code): no edge to the other levels, so Betty steps it every iteration as a lowest level,
    after the levels listed before it. It descends on the hinge loss between its batch's images and their
    reconstructions by the network as it stands (``mqvae.nn.gan.hinge_loss``), and gives the levels that train the
    network VQ-GAN's GAN term through ``generator_terms`` (the model's ``adversary``): d_weight * disc_weight *
    (-mean D(x_hat)), which reaches the encoder-decoder by its gradient and the codebook through the hypergradient
    (the upper level's loss holds the term). For the first ``disc_start`` iterations there is neither."""

    @dataclass
    class Params:
        # Iterations without the adversarial part: from iteration disc_start + 1 the discriminator steps and the
        # network's loss has the GAN term. (The authors' code steps the discriminator from iteration disc_start, one
        # iteration before its GAN term starts.) The level's lr schedule spans its train.iters - disc_start steps.
        disc_start: int = spec(0, min=0)
        # The GAN term's weight beside the adaptive weight (the authors' rate_d, Esser et al.'s disc_weight).
        disc_weight: float = spec(1.0, min=0.0)
        # PatchGAN's first width and its stride-2 stages (VQ-GAN: 64 and 3).
        filters: int = spec(64, min=1)
        layers: int = spec(3, min=1)
        # VQ-GAN's BatchNorm, or none: BatchNorm's statistics are those of each rank's batch, so only with none
        # do data-parallel ranks train as one process with the global batch.
        norm: str = spec("batch", choices=["batch", "none"])

    @classmethod
    def module_of(cls, model, params):
        task = getattr(model, "task", None)
        if task is None or not task.outputs_images or model.image_channels is None:
            raise UserError("levels: a Discriminator judges reconstructed images; this model is trained for "
                            f"{getattr(task, 'name', 'no task')}")
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            # Its step runs the network on its own batch, which would move BatchNorm's running statistics.
            raise UserError("levels: a Discriminator runs the network on its own batches, which would move the "
                            "running statistics of model.norm: batch; use model.norm: none")
        return PatchDiscriminator(model.image_channels, params.filters, params.layers, params.norm)

    @classmethod
    def scheduled_steps(cls, steps: int, params) -> int:
        return max(1, steps - params.disc_start)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.model.adversary is not None:
            raise UserError("levels: more than one Discriminator level; the network's loss takes one GAN term")
        self.model.adversary = self
        self.iteration = 0  # the engine's, set before each iteration's steps (begin_iteration)

    def begin_iteration(self, step: int) -> None:
        self.iteration = step

    def periodic_from(self) -> int:
        return self.params.disc_start + 1

    @property
    def on(self) -> bool:
        return self.iteration > self.params.disc_start

    def step(self, global_step=None):
        if self.on:
            super().step(global_step)

    def loss_terms(self, batch) -> dict:
        x = batch[0]
        with torch.no_grad():  # the network's parameters are not this level's
            fake = self.model(x).output
        logits_real, logits_fake = self.module(x), self.module(fake)
        return {"loss": hinge_loss(logits_real, logits_fake), "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean()}

    def generator_terms(self, output: torch.Tensor, nll: torch.Tensor, model) -> dict:
        """VQ-GAN's GAN term of the network's loss, {} before ``disc_start``: ``weighted`` = d_weight * disc_weight *
        gan, with gan = -mean D(x_hat) and d_weight the adaptive weight (``mqvae.nn.gan.adaptive_weight``) from the
        gradients of ``nll`` (the task loss: reconstruction + perceptual) and of gan at the decoder's last layer."""
        if not self.on:
            return {}
        gan = -self.module(output).mean()
        last = model.last_layer()
        nll_grad, gan_grad = (torch.autograd.grad(loss, last, retain_graph=True)[0] for loss in (nll, gan))
        # Data-parallel: the gradients of the global batch, so that every rank takes one process's weight.
        distributed.average_([nll_grad, gan_grad])
        d_weight = adaptive_weight(nll_grad, gan_grad)
        return {"weighted": d_weight * self.params.disc_weight * gan, "gan": gan, "d_weight": d_weight}


def register_problem(cls: type[Level]) -> type[Level]:
    """Make a Level subclass nameable in a config's ``levels.*.problem`` by its class name (a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Level)):
        raise TypeError(f"register_problem takes a subclass of problems.Level, got {cls!r}")
    PROBLEMS.add(cls.__name__, cls)
    return cls


for _cls in (VQVAE, AutoEncoder, Encoder, Decoder, Classifier, Codebook, CommitmentWeight, Prior, Discriminator):
    register_problem(_cls)
