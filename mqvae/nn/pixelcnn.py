"""A gated PixelCNN over maps of discrete codes (van den Oord et al. 2016, "Conditional Image Generation with
PixelCNN Decoders"), the prior of MQ-VAE Fig. 3.

Each layer has a vertical stack, which sees every row above the current one (all columns, so there is no
blind spot), and a horizontal stack, which sees the current row to the left; both use the gated activation
tanh(W_f * x + V_f h) ⊙ sigmoid(W_g * x + V_g h) (their Eq. 2 and 4, h the class embedding). Causality comes
from the kernel shapes and shifts rather than from masked weights:

- the vertical stack's kernel covers rows i - k//2 .. i (height k//2 + 1, cut below the current row), and it
  reaches the horizontal stack only shifted down by one row, so position (i, j) gets rows < i from it;
- the horizontal stack's kernel covers columns j - k//2 .. j. In the first layer (mask type A) the input is
  shifted right by one column, so (i, j) sees columns < j of its row and never its own code; later layers
  (mask type B) see their own position, whose features depend only on earlier codes;
- the first layer has no residual connection (it would add the position's own code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _gate(x: torch.Tensor) -> torch.Tensor:
    """tanh ⊙ sigmoid of the two halves of the channels (van den Oord et al. 2016, Eq. 2)."""
    f, g = x.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


def _down(x: torch.Tensor) -> torch.Tensor:
    """Shift the map down by one row (row 0 gets zeros)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def _right(x: torch.Tensor) -> torch.Tensor:
    """Shift the map right by one column (column 0 gets zeros)."""
    return F.pad(x, (1, 0))[..., :-1]


class GatedLayer(nn.Module):
    def __init__(self, channels: int, kernel: int, first: bool, num_classes: int):
        super().__init__()
        self.first, self.half = first, kernel // 2
        self.vertical = nn.Conv2d(channels, 2 * channels, (self.half + 1, kernel))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, self.half + 1))
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        # Class conditioning: a learned bias per class on both stacks' pre-activations (V h, their Eq. 4).
        self.condition = nn.Embedding(num_classes, 4 * channels) if num_classes else None

    def forward(self, v: torch.Tensor, h: torch.Tensor, labels: torch.Tensor | None):
        k = self.half
        if self.first:  # mask type A: the horizontal stack never sees its own position's code
            h_in = _right(h)
        else:
            h_in = h
        # Pad above and to both sides: the output row i covers input rows i - k .. i.
        v_pre = self.vertical(F.pad(v, (k, k, k, 0)))
        h_pre = self.horizontal(F.pad(h_in, (k, 0, 0, 0))) + self.vertical_to_horizontal(_down(v_pre))
        if self.condition is not None:
            bias_v, bias_h = self.condition(labels)[:, :, None, None].chunk(2, dim=1)
            v_pre, h_pre = v_pre + bias_v, h_pre + bias_h
        h_out = self.horizontal_out(_gate(h_pre))
        return _gate(v_pre), h_out if self.first else h + h_out


class GatedPixelCNN(nn.Module):
    """Logits p(c_p | c_<p [, y]) over ``num_codes`` codes at every position p of an H×W code map, in raster
    order. ``num_classes`` > 0: conditioned on a class label."""

    def __init__(self, num_codes: int, channels: int, layers: int, kernel: int, num_classes: int = 0):
        super().__init__()
        self.num_codes, self.num_classes = num_codes, num_classes
        self.embedding = nn.Embedding(num_codes, channels)
        self.layers = nn.ModuleList(GatedLayer(channels, kernel, i == 0, num_classes) for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                  nn.Conv2d(channels, num_codes, 1))

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, H, W) long -> logits (B, num_codes, H, W)."""
        return self.embedded_logits(self.embedding(codes).permute(0, 3, 1, 2), labels)

    def embedded_logits(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The logits from the embedded codes x (B, channels, H, W): each position's embedding depends on its
        own code only, so the causality of this map is that of ``forward``."""
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self.head(h)

    @torch.no_grad()
    def sample(self, shape: tuple[int, int], labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Code maps (B, H, W) drawn position by position in raster order; ``labels`` (B,) give B (ignored by an
        unconditional network). The draws come from ``generator`` alone."""
        height, width = shape
        codes = torch.zeros(labels.shape[0], height, width, dtype=torch.long, device=labels.device)
        for i in range(height):
            for j in range(width):
                logits = self(codes, labels if self.num_classes else None)[:, :, i, j]
                probs = torch.softmax(logits.float(), dim=1)
                codes[:, i, j] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return codes
