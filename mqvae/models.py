"""Networks around the quantizer: the VQ-VAE backbone and the ResNet-18 classifier.

``VQModel`` is the whole network x -> encoder -> quantizer -> decoder -> task loss.
Every level's Betty Problem evaluates the same ``VQModel.loss`` (MQ-VAE Eq. 6);
the levels differ only in which of its parameters they train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .quantizer import Quantizer, QuantizerOutput


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
    """Strided 4x4 convolutions (each halves the resolution), a 3x3 conv, residual blocks, 1x1 to the code dim."""

    def __init__(self, in_channels: int, cfg: ModelConfig, dim: int):
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

    def __init__(self, out_channels: int, cfg: ModelConfig, dim: int):
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

    def forward(self, z):
        return self.net(z)


@dataclass
class ModelOutput:
    output: torch.Tensor  # reconstruction or class logits
    z_e: torch.Tensor
    quant: QuantizerOutput


class VQModel(nn.Module):
    """encoder -> quantizer -> decoder, with the task loss of MQ-VAE Eq. 6 (MSE for reconstruction, CE for classification)."""

    def __init__(self, encoder: nn.Module, quantizer: Quantizer, decoder: nn.Module, task: str):
        super().__init__()
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder
        self.task = task

    def forward(self, x) -> ModelOutput:
        z_e = self.encoder(x)
        quant = self.quantizer(z_e)
        return ModelOutput(self.decoder(quant.z_q), z_e, quant)

    def task_loss(self, output, batch) -> torch.Tensor:
        x, y = batch
        if self.task == "reconstruction":
            return F.mse_loss(output, x)
        return F.cross_entropy(output, y)

    def loss(self, batch, weights: dict | None = None) -> dict:
        """MQ-VAE Eq. 6: L_task + beta * L_commit + L_codebook (+ the quantizer's other terms).

        ``weights`` overrides the quantizer's loss weights by name (a level may learn one, e.g. beta).
        Returns the total under ``loss`` and every term by name, all tensors (no host sync).
        """
        out = self(batch[0])
        terms = {"task": self.task_loss(out.output, batch), **out.quant.losses}
        scale = {**self.quantizer.loss_weights(), **(weights or {})}
        total = terms["task"]
        for name, value in out.quant.losses.items():
            total = total + scale[name] * value
        return {"loss": total, **terms, "perplexity": out.quant.perplexity, "_out": out}

    def quantization_loss(self, batch) -> torch.Tensor:
        """The part of Eq. 6 that can reach the codebook when the task loss cannot (plain straight-through):
        an encoder forward and the quantizer's losses, no decoder. Used by the hypergradient's
        finite-difference passes, which need only the codebook gradient."""
        z_e = self.encoder(batch[0])
        quant = self.quantizer(z_e)
        scale = self.quantizer.loss_weights()
        return sum(scale[name] * value for name, value in quant.losses.items())


def build_model(cfg, channels: int, num_classes: int) -> VQModel:
    """The network a config describes, on the CPU (the engine moves it)."""
    from .quantizer import build_quantizer

    quantizer = build_quantizer(cfg.quantizer)
    if cfg.model.kind == "vqvae":
        encoder = Encoder(channels, cfg.model, cfg.quantizer.dim)
        decoder = Decoder(channels, cfg.model, cfg.quantizer.dim)
        return VQModel(encoder, quantizer, decoder, task="reconstruction")
    from .classifier import resnet18_halves

    encoder, decoder = resnet18_halves(channels, num_classes, cfg.quantizer.dim)
    return VQModel(encoder, quantizer, decoder, task="classification")
