"""Affine re-parameterization of the code-vectors (Huh et al. 2023, §4.1, A.1, A.9, A.12).

The effective code is ``c̃_k = scale_a ⊙ c_k + bias_a`` (Huh Eq. 15: c = c_mean + c_std ⊙ c_signal),
with one (scale, bias) pair of vectors per *affine group* a of codes (``affine_groups`` contiguous
blocks of codes; 1 = one pair shared by the whole codebook). Because every effective code depends on
the shared pair, a step on the pair moves every code, including codes no vector selected (A.9).

Two variants:
- ``LearnedAffine`` (``affine: learned``): scale = 1 + r·s and bias = r·t with r = ``affine_lr`` and
  parameters s, t (zero at the start) trained with the codebook at the learning rate of its optimizer
  group (Huh A.1). The factor r sets the pair's step: under SGD the scale moves by lr·r² times its
  gradient; under Adam, whose step on s is about lr whatever the gradient's size, by about lr·r. Weight
  decay pulls s and t to 0, so the map toward the identity.
- ``RunningAffine`` (``affine: ema``): scale and bias are read off running statistics of z_e and of
  the codes (Huh A.12, Eq. 38-45). The statistics are buffers updated only by the explicit
  maintenance call, never by a forward.
"""

from __future__ import annotations

import torch
from torch import nn

# Added to the codes' variance before dividing by it (as the reference library does).
VAR_EPS = 1e-8


class CodeAffine(nn.Module):
    """c̃ = scale ⊙ c + bias, per affine group of codes (Huh Eq. 15)."""

    def __init__(self, num_codes: int, code_dim: int, affine_groups: int):
        super().__init__()
        self.num_codes, self.code_dim, self.affine_groups = num_codes, code_dim, affine_groups
        self.codes_per_group = num_codes // affine_groups

    def scale_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, bias), each (affine_groups, code_dim)."""
        raise NotImplementedError

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Effective codes of all K raw codes (K×d -> K×d)."""
        scale, bias = self.scale_bias()
        grouped = codes.reshape(self.affine_groups, self.codes_per_group, self.code_dim)
        return (grouped * scale[:, None] + bias[:, None]).reshape(codes.shape)

    @torch.no_grad()
    def invert(self, effective: torch.Tensor) -> torch.Tensor:
        """Raw codes whose effective codes are ``effective`` (K×d, one row per code, in code order)."""
        scale, bias = self.scale_bias()
        grouped = effective.reshape(self.affine_groups, self.codes_per_group, self.code_dim)
        return ((grouped - bias[:, None]) / scale[:, None]).reshape(effective.shape)


class LearnedAffine(CodeAffine):
    """Shared scale and bias learned through parameters s and t (Huh §4.1, A.1); starts at the identity."""

    def __init__(self, num_codes: int, code_dim: int, affine_groups: int, affine_lr: float):
        super().__init__(num_codes, code_dim, affine_groups)
        self.affine_lr = affine_lr
        self.s = nn.Parameter(torch.zeros(affine_groups, code_dim))
        self.t = nn.Parameter(torch.zeros(affine_groups, code_dim))

    def scale_bias(self):
        # Huh A.1: scale = 1 + affine_lr·s, bias = affine_lr·t. The zero that weight decay pulls s, t to is the
        # identity map.
        return 1 + self.affine_lr * self.s, self.affine_lr * self.t


class RunningAffine(CodeAffine):
    """Scale and bias from running moments (Huh A.12): the codes of each affine group are centred on
    their running mean and rescaled to the running moments of z_e (Eq. 43):

        c̃ = sqrt(σ²_e / (σ²_c + eps)) ⊙ (c − μ_c) + μ_e,   so  scale = σ_e/σ_c,  bias = μ_e − scale ⊙ μ_c.

    (Eq. 43-45 as printed add σ_e where μ_e belongs and swap the names c_mean / c_std; the form above
    is the one that matches the moments, which is A.12's stated aim, and the reference library's.)

    Statistics per dimension, biased variances. "z_q" of Eq. 40-41 is taken to be the raw codebook C
    of the group (all its codes), as in A.9 ("we compute the moments of both z_e and C") and the
    reference library: the moments of the selected codes would depend on the assignment, which the
    affine map itself decides. The z_e moments of an affine group are pooled over the latent groups
    whose codebook slice holds codes of that affine group.

    Before the first update the map is the identity. An EMA needs a starting value that Eq. 38-41 do
    not give; the first update sets the statistics to the batch's moments (as the reference library
    does), later ones apply Eq. 38-41 with momentum m = ``affine_momentum``.
    """

    def __init__(self, num_codes: int, code_dim: int, affine_groups: int, latent_groups: int, momentum: float):
        super().__init__(num_codes, code_dim, affine_groups)
        self.momentum = momentum
        codes_per_latent = num_codes // latent_groups
        # members[a]: the latent groups whose codebook slice intersects affine group a.
        self.members = [
            sorted({k // codes_per_latent for k in range(a * self.codes_per_group, (a + 1) * self.codes_per_group)})
            for a in range(affine_groups)
        ]
        shape = (affine_groups, code_dim)
        self.register_buffer("running_ze_mean", torch.zeros(shape))
        self.register_buffer("running_ze_var", torch.ones(shape))
        self.register_buffer("running_code_mean", torch.zeros(shape))
        self.register_buffer("running_code_var", torch.ones(shape))
        self.register_buffer("running_initialized", torch.zeros((), dtype=torch.bool))

    def scale_bias(self):
        scale = (self.running_ze_var / (self.running_code_var + VAR_EPS)).sqrt()
        bias = self.running_ze_mean - scale * self.running_code_mean
        # Identity until the first update (a tensor select, so no host sync and no state change).
        scale = torch.where(self.running_initialized, scale, torch.ones_like(scale))
        bias = torch.where(self.running_initialized, bias, torch.zeros_like(bias))
        return scale, bias

    @torch.no_grad()
    def local_statistics(self, vectors: torch.Tensor) -> dict:
        """Sufficient statistics of this process's z_e vectors (N×G×d, as the quantizer compares them),
        per affine group: count, and sums of (z − shift) and (z − shift)². They are sums, so a data-
        parallel run all-reduces them (SUM) before ``update``. The shift is the running mean (identical
        on every process), which keeps the one-pass variance free of cancellation."""
        vectors = vectors.to(self.running_ze_mean.dtype)
        count, total, total_sq = [], [], []
        for a, members in enumerate(self.members):
            centred = vectors[:, members].reshape(-1, self.code_dim) - self.running_ze_mean[a]
            count.append(centred.shape[0])
            total.append(centred.sum(0))
            total_sq.append(centred.square().sum(0))
        return {
            # (Filled on the device: a tensor from the host list would be a copy from pageable memory, which waits.)
            "ze_count": torch.stack([vectors.new_full((), n) for n in count]),
            "ze_sum": torch.stack(total),
            "ze_sum_sq": torch.stack(total_sq),
        }

    @torch.no_grad()
    def update(self, stats: dict, codes: torch.Tensor) -> None:
        """Huh Eq. 38-41 from (reduced) z_e statistics and the current raw codes K×d."""
        n = stats["ze_count"][:, None]
        shifted_mean = stats["ze_sum"] / n
        ze_mean = self.running_ze_mean + shifted_mean
        ze_var = (stats["ze_sum_sq"] / n - shifted_mean.square()).clamp_min(0)
        grouped = codes.detach().to(ze_mean.dtype).reshape(self.affine_groups, self.codes_per_group, self.code_dim)
        code_var, code_mean = torch.var_mean(grouped, dim=1, correction=0)
        # The first update starts the averages at the batch moments: m = 1 there.
        one = torch.ones((), dtype=ze_mean.dtype, device=ze_mean.device)
        m = torch.where(self.running_initialized, one * self.momentum, one)
        for running, batch in ((self.running_ze_mean, ze_mean), (self.running_ze_var, ze_var),
                               (self.running_code_mean, code_mean), (self.running_code_var, code_var)):
            running.copy_(m * batch + (1 - m) * running)  # Eq. 38, 39, 40, 41
        self.running_initialized.fill_(True)
