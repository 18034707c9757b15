"""The quantizer interface, its result type and the helpers every quantizer shares.

A quantizer's forward is pure: it returns a ``QuantizerOutput`` and changes
nothing (no parameter, no buffer). Codebook maintenance (data-dependent init,
dead-code replacement, running statistics) is an explicit call the training
loop makes, so that the hypergradient's perturbed evaluations can run the
quantizer with nothing updated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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
    """Interface every quantizer implements. A quantizer kind (``quantizer.kind``, mqvae.registry.QUANTIZERS) is a
    subclass built as ``kind(cfg)`` from the config's quantizer section (or any object with its fields)."""

    num_codes: int

    @classmethod
    def check_settings(cls, cfg) -> None:
        """Reject settings of the quantizer section that mean nothing for this kind, with one line naming the keys
        (a ``UserError``). Called before the quantizer is built."""

    @classmethod
    def size(cls, cfg) -> tuple[int, int]:
        """(parameters, buffer bytes) of the quantizer ``cfg`` describes, for the memory estimate made before
        anything is allocated (mqvae.config.feasibility). This default builds it on the meta device."""
        with torch.device("meta"):
            module = cls(cfg)
        return (sum(p.numel() for p in module.parameters()),
                sum(b.numel() * b.element_size() for b in module.buffers()))

    @classmethod
    def activation_width(cls, cfg) -> int:
        """Numbers the quantizer keeps per latent vector in a training step, beside z_e (for the memory estimate)."""
        return cfg.dim

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

    @property
    def maintains(self) -> bool:
        """Whether ``maintain`` changes anything (a data-parallel run then gathers the global batch for it)."""
        return False

    def maintain(self, z_e: torch.Tensor, out: QuantizerOutput) -> None:
        """Explicit maintenance after a training iteration (dead-code replacement, running statistics)."""

    def begin_iteration(self, step: int, iters: int) -> None:
        """Before training iteration ``step`` of ``iters`` (1-based), outside any forward and any CUDA graph: set
        what follows a schedule over training (Gumbel-VQ's temperature), in place, without a host sync."""

    def initialize(self, z_e: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Data-dependent initialization from encoder outputs (k-means), drawing from ``generator``."""


def code_counts(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """How often each of ``num_codes`` codes occurs in ``indices`` (int64, exact). Not ``torch.bincount``, which
    reads the smallest and the largest index on the host first: on CUDA two synchronisations per call."""
    flat = indices.reshape(-1)
    counts = torch.zeros(num_codes, dtype=torch.long, device=flat.device)
    return counts.index_add_(0, flat, torch.ones_like(flat))


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
    # Dense in z_e's own layout (perf.channels_last: NHWC, where this view already is dense, so no copy): a
    # channels-last view reaching a decoder with NCHW weights had strides that torch.compile's convolution
    # backward (torch 2.11, CUDA) rejected at run time.
    out = v.reshape(b, *spatial, d).movedim(-1, 1)
    nhwc = like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)
    return out.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


def straight_through(z: torch.Tensor, q: torch.Tensor, nu: float = 0.0, *, sg_z: torch.Tensor | None = None,
                     sg_q: torch.Tensor | None = None) -> torch.Tensor:
    """Straight-through estimator (MQ-VAE Eq. 3, Huh Eq. 7) with Huh's synchronized update (Eq. 21).

    Forward value: exactly ``q`` (``x - x.detach()`` is exactly 0, and ``q + 0 == q``; the usual
    ``z + (q - z).detach()`` is off by a rounding error). Backward: dz_q/dz = I, so the encoder gets
    the plain STE gradient; dz_q/dq = nu·I, so the codes receive nu·dL/dz_q. With nu = 0 the term is
    left out altogether, so the task loss has no graph edge to the codebook at all.

    This is Huh §4.3's ``z + (z_q - z).detach() + nu * (z_q - z_q.detach())`` with the same gradients.
    Eq. 21's extra term comes out of one gradient step on the codes: the step on a code is
    -eta·nu·dL_task/dz_q, i.e. Eq. 21 with eta² replaced by eta·nu. (Eq. 21 prints +eta²; substituting
    the encoder's STE step z_e(t+1) = z_e(t) - eta·dL_task/dz_q into Eq. 20 gives -eta², a descent step,
    which is what this implements.)

    ``sg_z``, ``sg_q``: ``z.detach()`` and ``q.detach()``, where the caller has them already (the quantizer's
    losses detach both too; each detach is an operation of its own).
    """
    sg_z = z.detach() if sg_z is None else sg_z
    sg_q = q.detach() if sg_q is None else sg_q
    z_q = sg_q + (z - sg_z)
    if nu:
        z_q = z_q + nu * (q - sg_q)
    return z_q
