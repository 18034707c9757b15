"""The adversarial part of VQ-GAN (Esser et al. 2021), which MQ-GAN (MQ-VAE App. G) trains as a third level: the
PatchGAN discriminator, its hinge loss, and the generator's adaptive weight.

Pure torch, no config: ``problems.levels.Discriminator`` trains the discriminator and hands the generator's side to
the model (``QuantizedNetwork.adversary``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Esser et al.'s bounds of the adaptive weight: the 1e-4 keeps it finite where the GAN term's gradient vanishes,
# the clamp keeps one batch from giving the GAN term a weight of millions.
ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as VQ-GAN uses it: a 4x4 stride-2 convolution and LeakyReLU(0.2); ``layers`` - 1
    more stride-2 stages, each doubling the width (at most 8x ``filters``) with a norm; one stride-1 stage; a 4x4
    convolution to one logit per patch. ``norm``: ``batch`` (VQ-GAN's) or ``none`` (per-rank batch statistics would
    make data-parallel runs differ from one process). Weights start from N(0, 0.02), norm scales from N(1, 0.02), as
    in DCGAN and VQ-GAN."""

    def __init__(self, in_channels: int, filters: int = 64, layers: int = 3, norm: str = "batch"):
        super().__init__()
        with_norm = norm == "batch"

        def stage(cin, cout, stride):
            # Without a norm the convolution keeps its bias (a norm's shift would make it redundant).
            conv = nn.Conv2d(cin, cout, 4, stride=stride, padding=1, bias=not with_norm)
            return [conv, *([nn.BatchNorm2d(cout)] if with_norm else []), nn.LeakyReLU(0.2)]

        body = [nn.Conv2d(in_channels, filters, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = filters
        for n in range(1, layers + 1):
            out = filters * min(2 ** n, 8)
            body += stage(width, out, 2 if n < layers else 1)
            width = out
        body.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*body)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss, 0.5 * [mean relu(1 - D(x)) + mean relu(1 + D(x_hat))] (Lim & Ye 2017, VQ-GAN)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll_grad: torch.Tensor, gan_grad: torch.Tensor) -> torch.Tensor:
    """VQ-GAN's weight of the generator's GAN term (Esser et al. 2021, Eq. 7): ||grad_L nll|| / (||grad_L gan|| + 1e-4),
    clamped to [0, 1e4] and detached, from the two losses' gradients at the decoder's last layer L. It scales the GAN
    term's gradient to the size of the reconstruction's."""
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(gan_grad) + ADAPTIVE_WEIGHT_EPS)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()
