"""Data-dependent codebook initialization: k-means++ seeding, then Lloyd k-means.

Huh et al. (2023), "Straightening Out the Straight-Through Estimator", Sec. 3.2
and Appendix A.7: the STE gradient error is bounded by the quantization error,
and the quantization error at initialization predicts index collapse, so codes
are initialized from the encoder's embeddings with k-means rather than from a
data-independent distribution. Seeding follows k-means++ (Arthur &
Vassilvitskii, 2007, "k-means++: The Advantages of Careful Seeding").
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from mqvae.nn.search import nearest_codes


@torch.no_grad()
def kmeans_init(
    z: Tensor,
    num_codes: int,
    *,
    iters: int = 10,
    generator: torch.Generator | None = None,
    noise: float = 1e-3,
) -> Tensor:
    """Return a num_codes×D codebook fitted to the N×D embeddings ``z``.

    With N >= num_codes: k-means++ seeding then ``iters`` Lloyd iterations.
    An empty cluster keeps its previous centre: that cannot increase the
    quantization error (so every Lloyd step is non-increasing) and draws no
    extra random numbers.

    With N < num_codes the codebook size still never shrinks: every input is
    used once and the remaining codes are drawn from the inputs with
    replacement; all codes then get Gaussian noise of std ``noise`` times the
    standard deviation of all entries of ``z``, so that repeated inputs give
    distinct codes. Lloyd iterations are skipped: each input already sits on a
    code.

    Runs on ``z``'s device, in ``z``'s dtype promoted to at least float32, and
    returns ``z``'s dtype. ``generator`` (which, as torch requires, must live
    on ``z``'s device) makes the result deterministic, on CUDA too: the centre
    sums are accumulated with torch's deterministic ``index_add_``.
    D² sampling uses ``torch.multinomial``, limited to 2**24 inputs: subsample
    larger ``z`` first.
    """
    if z.dim() != 2 or z.shape[0] == 0 or not z.is_floating_point():
        raise ValueError(f"expected a non-empty floating-point N×D tensor, got {z.dtype} of shape {tuple(z.shape)}")
    if num_codes < 1:
        raise ValueError(f"num_codes must be >= 1, got {num_codes}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")

    x = z.detach().to(torch.promote_types(z.dtype, torch.float32))
    if x.shape[0] < num_codes:
        codes = _codes_from_few_inputs(x, num_codes, generator, noise)
    else:
        codes = _kmeans_plus_plus(x, num_codes, generator)
        for _ in range(iters):
            codes = _lloyd_step(x, codes)
    return codes.to(z.dtype)


def _codes_from_few_inputs(x: Tensor, num_codes: int, generator: torch.Generator | None, noise: float) -> Tensor:
    n = x.shape[0]
    every_input = torch.randperm(n, generator=generator, device=x.device)
    extra = torch.randint(n, (num_codes - n,), generator=generator, device=x.device)
    codes = x[torch.cat([every_input, extra])]
    jitter = torch.randn(codes.shape, generator=generator, device=x.device, dtype=x.dtype)
    return codes + jitter * (noise * x.std(correction=0))


def _kmeans_plus_plus(x: Tensor, num_codes: int, generator: torch.Generator | None) -> Tensor:
    # D² sampling: each new centre is a data point drawn with probability
    # proportional to its squared distance to the nearest centre so far.
    n, dim = x.shape
    centres = x.new_empty(num_codes, dim)
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centres[:1] = x[first]
    # Distances are computed directly as ‖x − c‖² (not expanded) so that
    # points equal to a centre get exactly zero weight.
    min_sq_dist = (x - centres[0]).pow(2).sum(dim=1)
    for i in range(1, num_codes):
        # When every point coincides with a centre (duplicated data) all
        # weights are zero; torch.multinomial would fail, so sample uniformly.
        weights = torch.where(min_sq_dist.sum() > 0, min_sq_dist, torch.ones_like(min_sq_dist))
        pick = torch.multinomial(weights, 1, generator=generator)
        centres[i : i + 1] = x[pick]
        min_sq_dist = torch.minimum(min_sq_dist, (x - centres[i]).pow(2).sum(dim=1))
    return centres


@contextmanager
def _deterministic():
    # CUDA's index_add_ accumulates floats with atomics in arbitrary order unless torch's deterministic
    # mode is on; the mode is a global flag, so it is set for this call and the user's setting restored.
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _lloyd_step(x: Tensor, centres: Tensor) -> Tensor:
    assignment, _ = nearest_codes(x, centres, distances=False)
    with _deterministic():
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
    counts = torch.bincount(assignment, minlength=centres.shape[0]).unsqueeze(1)
    means = sums / counts.clamp(min=1).to(x.dtype)
    return torch.where(counts > 0, means, centres)
