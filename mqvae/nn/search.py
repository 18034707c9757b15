"""Nearest-code assignment with bounded memory.

Vector quantization assigns every embedding ``z_i`` to its nearest code-vector
``c_k``. The naive ``cdist`` + ``argmin`` allocates the full N×K distance matrix,
which does not fit in memory once N approaches a million vectors. Following
Huh et al. (2023), "Straightening Out the Straight-Through Estimator",
Appendix A.1 ("VQ configuration and implementation"), we divide and conquer:
blocks of rows of ``z`` (and, for large K, blocks of codes) are scored one at a
time, keeping a running (min, argmin). Optionally the scores are computed in
half precision, and the chosen index is then used to look the code up in full
precision, so the returned distance carries no half-precision error.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

_HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# Tile sizes (distance entries) measured by ``python -m engines.bench``: on a CPU a 4 MiB tile stays in cache,
# so the min-reduction reads it from there (2-3x the throughput of one N x K matrix); a GPU wants large tiles.
DEFAULT_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}


@functools.lru_cache(maxsize=None)
def _half_matmul_supported(device: torch.device, dtype: torch.dtype) -> bool:
    # Some CPU builds lack half-precision matmul kernels; probe once per
    # (device, dtype) so an unsupported request fails with a clear message
    # instead of a kernel error deep inside the loop.
    x = torch.ones(2, 2, device=device, dtype=dtype)
    try:
        torch.addmm(x[0], x, x.T)
    except RuntimeError:
        return False
    return True


def _score_dtype(z: Tensor, precision: str) -> torch.dtype:
    if precision == "fp32":
        return z.dtype
    if precision not in _HALF_DTYPES:
        raise ValueError(f"precision must be 'fp32', 'fp16' or 'bf16', got {precision!r}")
    dtype = _HALF_DTYPES[precision]
    if not _half_matmul_supported(z.device, dtype):
        raise ValueError(
            f"precision={precision!r}: torch {torch.__version__} cannot run a {dtype} "
            f"matmul on device {z.device}; use precision='fp32' (or another half dtype)"
        )
    return dtype


def _power_of_two_scale(z: Tensor, codebook: Tensor) -> Tensor:
    # fp16 overflows above 65504, i.e. for code norms above 256, which
    # unnormalised embeddings do reach. Scaling every vector by the same power
    # of two is exact and multiplies all scores by the same positive factor, so
    # the argmin is unchanged while every score is bounded by a few units.
    max_norm = torch.cat([z.norm(dim=1), codebook.norm(dim=1)]).max()
    _, exponent = torch.frexp(max_norm)
    return torch.ldexp(torch.ones_like(max_norm), -exponent)


@torch.no_grad()
def nearest_codes(
    z: Tensor,
    codebook: Tensor,
    *,
    metric: str = "euclidean",
    chunk_elements: int | None = None,
    precision: str = "fp32",
    distances: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Index of, and squared distance to, the nearest code for every row of ``z``.

    Args:
        z: N×D embeddings.
        codebook: K×D code-vectors, same dtype and device as ``z``.
        metric: ``"euclidean"`` (argmin ‖z − c‖²) or ``"cosine"`` (argmax of the
            cosine similarity). For ``"cosine"`` both ``z`` and ``codebook`` are
            l2-normalised here, so callers may pass unnormalised vectors; this
            costs O((N + K)·D) next to the O(N·K·D) scoring.
        chunk_elements: at most this many distance entries exist at once
            (and row blocks hold at most max(1, chunk_elements // D) rows).
            Rows of ``z`` are processed in blocks and, when fewer than
            ``MIN_BLOCK_ROWS`` rows would fit beside the whole codebook, the
            codebook too, with a running (min, argmin) across code blocks.
            None: ``DEFAULT_CHUNK_ELEMENTS`` for the inputs' device type.
        precision: ``"fp32"`` scores in the inputs' dtype; ``"fp16"``/``"bf16"``
            score in that half dtype (Huh et al., 2023, A.1). Raises ValueError
            if this torch build cannot run that matmul on the inputs' device.
            Half precision may pick a near-tied code: the chosen code's true
            distance exceeds the best one by at most a few ε·(‖z‖ + ‖c‖)²,
            ε being the half dtype's machine epsilon.
        distances: whether to compute ``sq_dist``; False returns None in its
            place and saves its operations (a quantizer needs the indices only).

    Returns:
        ``(indices, sq_dist)``: LongTensor[N] and a tensor[N] in ``z``'s dtype.
        ``sq_dist`` is ‖z_i − c_{indices_i}‖² recomputed in ``z``'s dtype from
        the full-precision code, whatever ``precision`` was used for the search
        (for ``"cosine"``: between the normalised vectors, i.e. 2 − 2·cos).
        Exact ties go to the lowest code index.

    Pure: inputs are not modified, no autograd graph is recorded (assignment is
    not differentiable), and autocast is disabled so that ``"fp32"`` means it.
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected z: N×D and codebook: K×D, got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook is empty")
    if z.dtype != codebook.dtype or z.device != codebook.device:
        raise ValueError(
            f"z and codebook must share dtype and device, got {z.dtype}@{z.device} and {codebook.dtype}@{codebook.device}"
        )
    if not z.is_floating_point():
        raise ValueError(f"expected floating-point inputs, got {z.dtype}")
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    if chunk_elements is None:
        chunk_elements = DEFAULT_CHUNK_ELEMENTS.get(z.device.type, 1 << 24)
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    score_dtype = _score_dtype(z, precision)

    with torch.autocast(z.device.type, enabled=False):
        return _nearest_codes(z, codebook, metric, chunk_elements, score_dtype, distances)


def _block(t: Tensor, start: int, size: int, dim: int = 0) -> Tensor:
    """The block of ``t`` of ``size`` entries from ``start`` along ``dim``: ``t`` itself where that is all of it. A
    slice is an operation of its own, and in a training step the whole search is usually one tile."""
    if start == 0 and size >= t.shape[dim]:
        return t
    return t.narrow(dim, start, min(size, t.shape[dim] - start))


def _nearest_codes(
    z: Tensor, codebook: Tensor, metric: str, chunk_elements: int, score_dtype: torch.dtype, distances: bool
) -> tuple[Tensor, Tensor | None]:
    num_rows, num_codes = z.shape[0], codebook.shape[0]

    # Score = ‖c‖² − 2 z·c, i.e. ‖z − c‖² without the ‖z‖² term, which is
    # constant along a row and so irrelevant to the argmin. For cosine the
    # vectors are unit-norm and the score is −2 z·c (2 − 2cos minus the 2).
    if metric == "cosine":
        codebook = F.normalize(codebook, dim=1)
    # Unit vectors cannot overflow, nor can scores in the inputs' own dtype.
    needs_scale = metric == "euclidean" and score_dtype != z.dtype
    scale = _power_of_two_scale(z, codebook) if needs_scale else None
    score_codes = codebook if scale is None else codebook * scale
    if metric == "euclidean":
        code_bias = score_codes.pow(2).sum(dim=1).to(score_dtype)
    else:
        code_bias = score_codes.new_zeros(num_codes, dtype=score_dtype)
    score_codes_t = score_codes.to(score_dtype).T

    rows_per_block, codes_per_block = _block_shape(num_rows, num_codes, z.shape[1], chunk_elements)
    if num_rows == 0:
        return z.new_empty(0, dtype=torch.long), z.new_empty(0) if distances else None
    index_blocks, dist_blocks = [], []

    for start in range(0, num_rows, rows_per_block):
        z_rows = _block(z, start, rows_per_block)
        z_block = F.normalize(z_rows, dim=1) if metric == "cosine" else z_rows
        z_score = (z_block if scale is None else z_block * scale).to(score_dtype)

        best_score, best_index = None, None
        for code_start in range(0, num_codes, codes_per_block):
            scores = torch.addmm(_block(code_bias, code_start, codes_per_block), z_score,
                                 _block(score_codes_t, code_start, codes_per_block, dim=1), alpha=-2)
            # min(dim) returns the first minimum and the strict "<" below keeps
            # the earlier block on equality: exact ties go to the lowest index.
            block_score, block_index = scores.min(dim=1)
            if code_start:
                block_index += code_start
            if best_score is None:
                best_score, best_index = block_score, block_index
            else:
                better = block_score < best_score
                best_score = torch.where(better, block_score, best_score)
                best_index = torch.where(better, block_index, best_index)

        index_blocks.append(best_index)
        if distances:
            # Full-precision lookup of the chosen code (Huh et al., 2023, A.1).
            dist_blocks.append((z_block - codebook[best_index]).pow(2).sum(dim=1))
    indices = index_blocks[0] if len(index_blocks) == 1 else torch.cat(index_blocks)
    if not distances:
        return indices, None
    return indices, dist_blocks[0] if len(dist_blocks) == 1 else torch.cat(dist_blocks)


# A row block shorter than this makes the scoring matmul inefficient (it becomes a thin matrix-vector-like
# product); large codebooks are then split into code blocks instead of shrinking the row block further.
MIN_BLOCK_ROWS = 1024


def _block_shape(num_rows: int, num_codes: int, dim: int, chunk_elements: int) -> tuple[int, int]:
    """Rows and codes per scored tile, with rows x codes <= chunk_elements.

    The whole codebook is scored at once when at least MIN_BLOCK_ROWS rows fit beside it; otherwise the
    tile keeps MIN_BLOCK_ROWS rows and takes as many codes as fit. Row blocks are also capped at
    chunk_elements // D rows so that the per-block copies of z and of the looked-up codes stay bounded.
    """
    rows = max(1, chunk_elements // num_codes)
    if rows < MIN_BLOCK_ROWS:
        rows = min(MIN_BLOCK_ROWS, chunk_elements)
    rows = max(1, min(rows, num_rows, chunk_elements // dim))
    codes = max(1, min(num_codes, chunk_elements // rows))
    return rows, codes
