"""Vector quantizers.

A quantizer's forward is pure: it returns a ``QuantizerOutput`` and changes
nothing. Codebook maintenance (data-dependent init, dead-code replacement,
running statistics) is an explicit call the training loop makes, so that the
hypergradient's perturbed evaluations can run the quantizer with nothing updated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import QuantizerConfig
from .search import nearest_codes


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # what the decoder sees, shaped like z_e (straight-through in the backward pass)
    indices: torch.Tensor  # chosen code per vector: (N, groups), N = B*H*W
    losses: dict  # unweighted loss terms by name; weights come from Quantizer.loss_weights()
    perplexity: torch.Tensor  # 2^H of this batch's code usage (a tensor: no host sync)
    counts: torch.Tensor  # usage count of each code in this batch, (num_codes,)

    def detached(self) -> "QuantizerOutput":
        """A copy that holds no autograd graph (kept for maintenance after the step)."""
        return QuantizerOutput(self.z_q.detach(), self.indices, {}, self.perplexity.detach(), self.counts)


class Quantizer(nn.Module):
    """Interface every quantizer implements."""

    num_codes: int

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def loss_weights(self) -> dict:
        """Weight of each loss term by name (MQ-VAE Eq. 6)."""
        raise NotImplementedError

    @property
    def task_reaches_codebook(self) -> bool:
        """Whether dL_task/d(codebook parameters) can be non-zero. When it cannot, the codebook's
        gradient needs only an encoder forward (the hypergradient's finite differences use this)."""
        raise NotImplementedError

    def maintain(self, z_e: torch.Tensor, out: QuantizerOutput) -> None:
        """Explicit maintenance after a training iteration (dead-code replacement, running statistics)."""

    def initialize(self, z_e: torch.Tensor) -> None:
        """Data-dependent initialization from encoder outputs (k-means)."""


def batch_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """2^H(p) of code usage, as a tensor so the hot loop never waits for the device."""
    p = counts.float() / counts.sum().clamp_min(1)
    entropy = -(p * torch.log2(p.clamp_min(1e-30))).sum()
    return torch.exp2(entropy)


def to_vectors(z: torch.Tensor) -> torch.Tensor:
    """B×D×H×W (or B×D) -> N×D, one row per spatial position."""
    if z.dim() == 2:
        return z
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def from_vectors(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 2:
        return v
    b, d, *spatial = like.shape
    return v.reshape(b, *spatial, d).movedim(-1, 1)


class VectorQuantizer(Quantizer):
    """Nearest-neighbour quantizer with the straight-through estimator (MQ-VAE Eq. 3-6)."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        self.num_codes = cfg.num_codes
        self.codebook = nn.Parameter(torch.empty(cfg.num_codes, cfg.dim).uniform_(-1 / cfg.num_codes, 1 / cfg.num_codes))

    def loss_weights(self) -> dict:
        return {"commitment": self.cfg.beta, "codebook": self.cfg.codebook_weight}

    @property
    def task_reaches_codebook(self) -> bool:
        return False

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        flat = to_vectors(z_e)
        indices, _ = nearest_codes(flat, self.codebook, chunk_elements=self.cfg.search_chunk, precision=self.cfg.search_precision)
        q = self.codebook[indices]
        losses = {
            # Eq. 4: moves the encoder output towards its code.
            "commitment": (flat - q.detach()).pow(2).mean(),
            # Eq. 5: moves the chosen codes towards the encoder outputs.
            "codebook": (flat.detach() - q).pow(2).mean(),
        }
        # Straight-through estimator (Eq. 3): the forward value is q, the gradient passes to z_e unchanged.
        z_q = flat + (q - flat).detach()
        counts = torch.bincount(indices, minlength=self.num_codes)
        return QuantizerOutput(from_vectors(z_q, z_e), indices[:, None], losses, batch_perplexity(counts), counts)


def build_quantizer(cfg: QuantizerConfig) -> Quantizer:
    return VectorQuantizer(cfg)
