"""The VQ-GAN encoder and decoder (Esser et al. 2021, "Taming Transformers"), the backbone of MQ-GAN (MQ-VAE
App. G): residual blocks with GroupNorm and swish, single-head spatial self-attention at chosen sides, a stride-2
stage between levels of widths ``hidden_channels * ch_mult[i]``.

The halves a ``model.kind: vqgan`` returns (``mqvae.method.models``) are the whole of what sits on either side of
the quantizer: the encoder ends with the 1x1 ``quant_conv`` to the code dim and the LayerNorm of z (the authors'
MQ-GAN applies it to ``quant_conv``'s output, before the quantizer), the decoder starts with the 1x1
``post_quant_conv`` back to ``z_channels``.

Settings come as an object with the model section's fields: ``hidden_channels`` (taming's ``ch``), ``ch_mult``,
``num_res_blocks``, ``attn_resolutions``, ``z_channels`` (None: the code dim), ``quant_conv``, ``z_norm``,
``dropout``, ``norm_groups``.
"""

from __future__ import annotations

import math

from torch import nn
from torch.nn import functional as F

# taming's GroupNorm eps.
GROUP_NORM_EPS = 1e-6


def group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)


def level_sides(image_size: int, levels: int) -> list[int]:
    """The feature maps' side at each level (``attn_resolutions`` are read against these): each stride-2 stage
    floors the side's half."""
    return [image_size // 2**i for i in range(levels)]


class ResidualBlock(nn.Module):
    """GroupNorm, swish, 3x3 conv, GroupNorm, swish, dropout, 3x3 conv, added to the input (through a 1x1 conv
    where the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float):
        super().__init__()
        self.block = nn.Sequential(
            group_norm(groups, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        return self.shortcut(x) + self.block(x)


class SelfAttention(nn.Module):
    """Single-head attention over the positions of a feature map: GroupNorm, 1x1 q, k, v, softmax(q k^T / sqrt(c))
    applied to v, a 1x1 projection, added to the input.

    Written out rather than with ``scaled_dot_product_attention``: Betty's second-order hypergradients (neumann,
    cg) differentiate twice, which the fused kernels' backward does not allow; and the softmax is a module, so the
    memory check (mqvae.config.feasibility, which counts leaf modules' outputs) sees the positions^2 weights."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(groups, channels)
        self.q, self.k, self.v, self.out = (nn.Conv2d(channels, channels, 1) for _ in range(4))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).reshape(b, c, h * w) for proj in (self.q, self.k, self.v))
        weights = self.softmax(q.transpose(1, 2) @ k / math.sqrt(c))  # [b, query, key]
        attended = (v @ weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.out(attended)


class Downsample(nn.Module):
    """A 3x3 stride-2 conv padded by one on the right and bottom only (taming's): a side n becomes floor(n / 2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each position of an N x C x H x W map (torch's normalizes the last dims)."""

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def _z_channels(cfg, dim: int) -> int:
    return dim if cfg.z_channels is None else cfg.z_channels


def _widths(cfg) -> list[int]:
    return [cfg.hidden_channels * mult for mult in cfg.ch_mult]


class VQGANEncoder(nn.Module):
    """Images of ``in_channels`` channels and side ``image_size`` -> ``dim``-wide latents of side
    image_size / 2^(len(ch_mult) - 1): conv_in 3x3, the levels (num_res_blocks residual blocks, each followed by
    attention where the level's side is in attn_resolutions; a stride-2 stage between levels), the middle (block,
    attention, block), GroupNorm, swish, conv_out 3x3 to z_channels; then ``quant_conv`` 1x1 to ``dim`` and the
    LayerNorm of z, each where set."""

    def __init__(self, in_channels: int, cfg, dim: int, image_size: int):
        super().__init__()
        groups, widths = cfg.norm_groups, _widths(cfg)
        sides = level_sides(image_size, len(widths))
        layers, width = [nn.Conv2d(in_channels, cfg.hidden_channels, 3, padding=1)], cfg.hidden_channels
        for level, out in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(width, out, groups, cfg.dropout))
                width = out
                if sides[level] in cfg.attn_resolutions:
                    layers.append(SelfAttention(width, groups))
            if level < len(widths) - 1:
                layers.append(Downsample(width))
        layers += [ResidualBlock(width, width, groups, cfg.dropout), SelfAttention(width, groups),
                   ResidualBlock(width, width, groups, cfg.dropout),
                   group_norm(groups, width), nn.SiLU(), nn.Conv2d(width, _z_channels(cfg, dim), 3, padding=1)]
        self.net = nn.Sequential(*layers)
        self.quant_conv = nn.Conv2d(_z_channels(cfg, dim), dim, 1) if cfg.quant_conv else nn.Identity()
        self.z_norm = ChannelLayerNorm(dim) if cfg.z_norm == "layer" else nn.Identity()

    def forward(self, x):
        return self.z_norm(self.quant_conv(self.net(x)))


class VQGANDecoder(nn.Module):
    """``dim``-wide latents -> images of ``out_channels`` channels and side ``image_size``: ``post_quant_conv`` 1x1
    to z_channels (where set), conv_in 3x3 to the widest level, the middle (block, attention, block), the levels
    from the deepest (num_res_blocks + 1 residual blocks, attention after each where the side is in
    attn_resolutions; nearest x2 and a 3x3 conv between levels), GroupNorm, swish, conv_out 3x3."""

    def __init__(self, out_channels: int, cfg, dim: int, image_size: int):
        super().__init__()
        groups, widths = cfg.norm_groups, _widths(cfg)
        sides = level_sides(image_size, len(widths))
        self.post_quant_conv = nn.Conv2d(dim, _z_channels(cfg, dim), 1) if cfg.quant_conv else nn.Identity()
        width = widths[-1]
        layers = [nn.Conv2d(_z_channels(cfg, dim), width, 3, padding=1),
                  ResidualBlock(width, width, groups, cfg.dropout), SelfAttention(width, groups),
                  ResidualBlock(width, width, groups, cfg.dropout)]
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(width, widths[level], groups, cfg.dropout))
                width = widths[level]
                if sides[level] in cfg.attn_resolutions:
                    layers.append(SelfAttention(width, groups))
            if level > 0:
                layers.append(Upsample(width))
        layers += [group_norm(groups, width), nn.SiLU(), nn.Conv2d(width, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    @property
    def last_layer(self) -> nn.Parameter:
        """conv_out's weight: the adaptive GAN weight (Esser et al. 2021, Eq. 7) compares gradients there."""
        return self.net[-1].weight

    def forward(self, z):
        return self.net(self.post_quant_conv(z))
