"""Networks around the quantizer: the VQ-VAE backbone (the VQ-GAN's halves are in ``mqvae.nn.vqgan``, the
ResNet-18 classifier's in ``mqvae.nn.resnet``; ``mqvae.method.models`` builds any of them from a config).

``QuantizedNetwork`` is the whole network x -> encoder -> quantizer -> decoder -> task loss (its task: any object
with ``loss(output, batch)``, ``mqvae.method.tasks``). Every level's Betty Problem evaluates the same ``QuantizedNetwork.loss`` (MQ-VAE Eq. 6);
the levels differ only in which of its parameters they train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mqvae.errors import UserError
from mqvae.nn.quantizers import Quantizer, QuantizerOutput


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


class ResidualBlock(nn.Module):
    """van den Oord et al. (2017): ReLU, 3x3 conv, ReLU, 1x1 conv, added to the input."""

    def __init__(self, channels: int, res_channels: int, norm: str):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, res_channels, 3, padding=1),
            _norm(norm, res_channels),
            nn.ReLU(),
            nn.Conv2d(res_channels, channels, 1),
            _norm(norm, channels),
        )

    def forward(self, x):
        return x + self.block(x)


class Encoder(nn.Module):
    """Strided 4x4 convolutions (each halves the resolution), a 3x3 conv, residual blocks, 1x1 to the code dim.
    ``cfg``: the widths (``hidden_channels``, ``res_channels``, ``num_res_blocks``, ``downsample``, ``norm``: the
    config's model section, or any object with them)."""

    def __init__(self, in_channels: int, cfg, dim: int):
        super().__init__()
        layers, channels = [], in_channels
        for i in range(cfg.downsample):
            out = cfg.hidden_channels // 2 if i < cfg.downsample - 1 else cfg.hidden_channels
            layers += [nn.Conv2d(channels, out, 4, stride=2, padding=1), _norm(cfg.norm, out), nn.ReLU()]
            channels = out
        layers.append(nn.Conv2d(channels, cfg.hidden_channels, 3, padding=1))
        layers += [ResidualBlock(cfg.hidden_channels, cfg.res_channels, cfg.norm) for _ in range(cfg.num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(cfg.hidden_channels, dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """Mirror of the encoder: 3x3 conv from the code dim, residual blocks, strided 4x4 transposed convolutions."""

    def __init__(self, out_channels: int, cfg, dim: int):
        super().__init__()
        layers = [nn.Conv2d(dim, cfg.hidden_channels, 3, padding=1)]
        layers += [ResidualBlock(cfg.hidden_channels, cfg.res_channels, cfg.norm) for _ in range(cfg.num_res_blocks)]
        layers.append(nn.ReLU())
        channels = cfg.hidden_channels
        for i in range(cfg.downsample):
            last = i == cfg.downsample - 1
            out = out_channels if last else cfg.hidden_channels // 2
            layers.append(nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1))
            if not last:
                layers += [_norm(cfg.norm, out), nn.ReLU()]
            channels = out
        self.net = nn.Sequential(*layers)

    @property
    def last_layer(self) -> nn.Parameter:
        """The last transposed convolution's weight: the adaptive GAN weight (Esser et al. 2021, Eq. 7) compares
        gradients there."""
        return self.net[-1].weight

    def forward(self, z):
        return self.net(z)


def _is_one(weight) -> bool:
    """Whether a loss weight is the number 1 (a tensor weight, e.g. a learned beta, is never taken for it)."""
    return isinstance(weight, (int, float)) and weight == 1


@dataclass
class ModelOutput:
    output: torch.Tensor  # reconstruction or class logits
    z_e: torch.Tensor
    quant: QuantizerOutput


class QuantizedNetwork(nn.Module):
    """encoder -> quantizer -> decoder, with the task loss of MQ-VAE Eq. 6 (``task``: MSE for reconstruction,
    CE for classification). ``range``: the interval (low, high) of the pixels it takes, and of the images it gives
    back where its task outputs images (the config's ``data.range``); evaluation maps both back to [0, 1]."""

    def __init__(self, encoder: nn.Module, quantizer: Quantizer, decoder: nn.Module, task,
                 *, range: tuple[float, float] = (0.0, 1.0), perceptual: nn.Module | None = None,
                 perceptual_weight: float = 0.0, image_channels: int | None = None):
        super().__init__()
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder
        self.task = task
        self.range = tuple(range)
        self.image_channels = image_channels  # of the input images (a discriminator's input; None: not given)
        # loss.perceptual_weight's frozen LPIPS network, (output, input) -> one distance per image: kept out of the
        # module tree (object.__setattr__), so that no level trains it and no checkpoint holds its weights; _apply
        # moves and casts it with the model.
        object.__setattr__(self, "perceptual", perceptual)
        self.perceptual_weight = perceptual_weight
        # The generator's side of an adversarial level (problems.levels.Discriminator sets it): an object whose
        # ``generator_terms(output, nll, model)`` gives the GAN term of Eq. 6's loss, or {} while it is off. Not a
        # module: the discriminator's parameters belong to its own level.
        self.adversary = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.perceptual is not None:
            self.perceptual._apply(fn, recurse)
        return self

    def forward(self, x, z_e: torch.Tensor | None = None) -> ModelOutput:
        """``z_e``: the encoder's output for ``x`` when the caller already has it (with its graph)."""
        z_e = self.encoder(x) if z_e is None else z_e
        quant = self.quantizer(z_e)
        return ModelOutput(self.decoder(quant.z_q), z_e, quant)

    def last_layer(self) -> nn.Parameter:
        """The weight of the decoder's final layer (its ``last_layer``), where the adaptive GAN weight of Esser et
        al. 2021 (Eq. 7: the ratio of the reconstruction's and the GAN loss's gradient norms) is measured."""
        layer = getattr(self.decoder, "last_layer", None)
        if layer is None:
            raise UserError(f"the decoder ({type(self.decoder).__name__}) has no last_layer: the adaptive GAN weight "
                            "needs the weight of its final layer; give the decoder a last_layer property")
        return layer

    def task_loss(self, output, batch) -> torch.Tensor:
        return self.task_terms(output, batch)["task"]

    def task_terms(self, output, batch) -> dict:
        """L_task of Eq. 6 under ``task``: the task's loss, plus ``perceptual_weight`` x LPIPS (VQ-GAN) where there is
        a perceptual network; then the two parts also by name, ``reconstruction`` and ``perceptual``."""
        task = self.task.loss(output, batch)
        if self.perceptual is None:
            return {"task": task}
        perceptual = self.perceptual(output, batch[0]).mean()
        return {"task": task + self.perceptual_weight * perceptual, "reconstruction": task, "perceptual": perceptual}

    def quantization_weighted(self, losses: dict, weights: dict | None = None) -> torch.Tensor:
        """Sum of the quantizer's loss terms with their weights (Eq. 6), ``weights`` overriding by name. A weight of
        exactly 1 multiplies nothing, and the sum starts at the first term, not at 0: the same numbers, two
        operations fewer per forward (and a multiplication fewer in the backward)."""
        scale = {**self.quantizer.loss_weights(), **(weights or {})}
        terms = [value if _is_one(scale[name]) else scale[name] * value for name, value in losses.items()]
        return sum(terms[1:], terms[0]) if terms else 0

    def loss(self, batch, weights: dict | None = None, z_e: torch.Tensor | None = None) -> dict:
        """MQ-VAE Eq. 6: L_task + beta * L_commit + L_codebook (+ the quantizer's other terms, and an adversarial
        level's GAN term).

        ``weights`` overrides the quantizer's loss weights by name (a level may learn one, e.g. beta);
        ``z_e`` is the encoder's output for ``batch`` when the caller already has it.
        Returns the total under ``loss`` and every term by name, all tensors (no host sync).
        """
        out = self(batch[0], z_e)
        terms = self.task_terms(out.output, batch)
        total = terms["task"] + self.quantization_weighted(out.quant.losses, weights)
        if self.adversary is not None:
            # VQ-GAN's generator term, d_weight * disc_weight * (-mean D(x_hat)), once the discriminator is on.
            adversarial = self.adversary.generator_terms(out.output, terms["task"], self)
            if adversarial:
                total = total + adversarial.pop("weighted")
                terms.update(adversarial)
        return {"loss": total, **terms, **out.quant.losses, "perplexity": out.quant.perplexity, "_out": out}

    def quantization_terms(self, batch) -> dict:
        """The quantizer's part of Eq. 6 (an encoder forward and the quantizer's losses, no decoder), with
        its terms by name.

        Its gradient with respect to the quantizer's parameters equals that of the full Eq. 6 when the task
        loss cannot reach the codebook (plain straight-through: z_q's forward value depends on C, its gradient
        goes to z_e only). The hypergradient's finite-difference passes and the xi = 0 codebook step use it.
        The encoder runs without recording a graph: no path from the quantizer's parameters goes through z_e,
        so no encoder activations are kept for a backward that never reaches them.
        """
        with torch.no_grad():
            z_e = self.encoder(batch[0])
        quant = self.quantizer(z_e)
        return {"loss": self.quantization_weighted(quant.losses), **quant.losses, "perplexity": quant.perplexity}
