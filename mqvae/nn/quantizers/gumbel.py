"""Gumbel-VQ baseline (Karpathy's deep-vector-quantization, also in Esser et al.'s taming-transformers;
Huh et al. 2023 A.1 "Baseline").

No nearest-code search: a 1×1 projection (here a Linear on each D-vector, the same map) predicts
``num_codes`` logits, a Gumbel-softmax sample of the code distribution weights the codebook, and the
loss adds KL(q(z|x) ‖ uniform). No commitment or codebook terms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mqvae.errors import UserError
from mqvae.nn.quantizers.base import Quantizer, QuantizerOutput, batch_perplexity, code_counts, from_vectors, to_vectors


class GumbelQuantizer(Quantizer):
    """Training mode: a Gumbel-softmax sample y = softmax((logits + g) / tau). With
    ``gumbel_straight_through: false`` the relaxed sample weights the codebook, z_q = y @ C (Karpathy's default);
    with ``true`` z_q = C[argmax y] exactly, and the gradient is the relaxed sample's (taming-transformers'
    default, Jang et al. 2017's straight-through estimator). Eval mode: the most likely code, z_q = C[argmax logits]
    exactly, with the straight-through gradient of softmax(logits / tau) (Karpathy and taming sample
    ``hard=True`` at eval; we take the argmax of the logits so that evaluation is deterministic and draws no random
    numbers).

    The temperature tau is a buffer that ``begin_iteration`` sets before each training iteration (constant, or
    annealed by ``gumbel_temperature_final``); it is a function of the step, so it is not saved with the model.

    The Gumbel noise comes from the global RNG (so a checkpointed RNG state reproduces a run); no
    parameter or buffer changes in forward.
    """

    @classmethod
    def check_settings(cls, cfg) -> None:
        # Gumbel-VQ predicts the code from logits: there is no nearest-code search, no straight-through
        # estimator and no commitment/codebook loss for these options to act on.
        for key, unused in (("affine", cfg.affine != "none"), ("sync_nu", cfg.sync_nu > 0),
                            ("replace_freq", cfg.replace_freq > 0), ("kmeans_init", cfg.kmeans_init),
                            ("l2", cfg.l2), ("groups", cfg.groups > 1), ("codebook_mlp", bool(cfg.codebook_mlp))):
            if unused:
                raise UserError(f"quantizer.{key}: {getattr(cfg, key)!r} cannot be combined with quantizer.kind: gumbel "
                                f"(it applies to nearest-code quantizers only; use kind: vq)")
        if cfg.gumbel_anneal_iters is not None and cfg.gumbel_temperature_final is None:
            raise UserError(f"quantizer.gumbel_anneal_iters: {cfg.gumbel_anneal_iters} needs "
                            "quantizer.gumbel_temperature_final (the temperature it anneals to); set it, or remove "
                            "gumbel_anneal_iters for a constant temperature")

    @classmethod
    def size(cls, cfg) -> tuple[int, int]:
        # The codebook, the logit projection and its bias; the temperature, one float32.
        return cfg.num_codes * cfg.dim + cfg.dim * cfg.num_codes + cfg.num_codes, 4

    @classmethod
    def activation_width(cls, cfg) -> int:
        return cfg.dim + cfg.num_codes  # z_q and the code logits

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.num_codes = cfg.num_codes
        self.proj = nn.Linear(cfg.dim, cfg.num_codes)
        # nn.Embedding's default init, as in Karpathy's GumbelQuantize.
        self.codebook = nn.Parameter(torch.randn(cfg.num_codes, cfg.dim))
        # A 0-dim tensor refilled in place, so that a captured CUDA graph reads each iteration's value.
        self.register_buffer("temperature", torch.tensor(float(cfg.gumbel_temperature)), persistent=False)

    def temperature_at(self, step: int, iters: int) -> float:
        """tau at training iteration ``step`` of ``iters``: gumbel_temperature at step 0, geometric to
        gumbel_temperature_final at step gumbel_anneal_iters (or ``iters``), and that value after it (Jang et al.
        2017 anneal tau exponentially to a floor)."""
        start, final = self.cfg.gumbel_temperature, self.cfg.gumbel_temperature_final
        if final is None:
            return start
        span = self.cfg.gumbel_anneal_iters or iters
        return start * (final / start) ** (min(step, span) / span)

    def begin_iteration(self, step: int, iters: int) -> None:
        self.temperature.fill_(self.temperature_at(step, iters))

    def loss_weights(self) -> dict:
        return {"kl": self.cfg.gumbel_kl_weight}

    @property
    def task_reaches_codebook(self) -> bool:
        return True  # z_q is a weighted sum of code-vectors

    def effective_codebook(self) -> torch.Tensor:
        """The K×D code-vectors z_q is made of (the codebook itself: no affine map, no normalization)."""
        return self.codebook

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        flat = to_vectors(z_e)
        logits = self.proj(flat)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        log_q = F.log_softmax(logits, dim=-1)
        # KL(q ‖ uniform) = Σ_k q_k (log q_k + log K), averaged over positions.
        kl = (log_q.exp() * (log_q + math.log(self.num_codes))).sum(-1).mean()
        tau = self.temperature
        codebook = self.codebook.to(logits.dtype)
        if self.training:
            soft = F.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)
            indices = soft.argmax(-1)
            z_q = straight_through(indices, soft, codebook) if self.cfg.gumbel_straight_through else soft @ codebook
        else:
            indices = logits.argmax(-1)
            z_q = straight_through(indices, F.softmax(logits / tau, dim=-1), codebook)
        counts = code_counts(indices, self.num_codes)
        return QuantizerOutput(from_vectors(z_q, z_e), indices[:, None], {"kl": kl}, batch_perplexity(counts), counts)


def straight_through(indices: torch.Tensor, soft: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Forward value exactly C[indices] ((soft - soft) @ C is exactly 0); backward: the codebook through the
    one-hot, the logits through ``soft`` (the gradient of F.gumbel_softmax(hard=True), whose forward value
    one_hot - soft + soft can differ from the one-hot by a rounding)."""
    return F.embedding(indices, codebook) + (soft - soft.detach()) @ codebook.detach()
