"""nearest_codes against independent float64 references.

Reference distances are computed directly (no ‖z‖² − 2z·c + ‖c‖² expansion)
in float64, so they are exact to ~1e-16 relative and share no code path with
the implementation under test.
"""

import pytest
import torch

import mqvae.nn.search
from mqvae.nn.search import nearest_codes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}

# (N, K, D) × chunk_elements. Tiny chunks force tiny row blocks and code
# blocks with a ragged last block; combinations that would
# need more than ~50k blocks are left out to keep the suite fast.
SHAPES = [(1, 1, 1), (257, 33, 7), (1000, 512, 64), (4096, 1024, 32)]
CHUNKS = [1, 100, 1000, 5000, 1 << 24]
SHAPE_CHUNKS = [(s, c) for s in SHAPES for c in CHUNKS if s[0] * s[1] / c <= 50_000]


def _data(n, k, d, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g) * scale
    c = torch.randn(k, d, generator=g) * scale
    return z.to(device), c.to(device)


def _sq_dist64(z, c):
    """Exact-enough float64 squared distances, N×K."""
    return torch.cdist(z.double(), c.double(), compute_mode="donot_use_mm_for_euclid_dist").square()


def _check_near_ties(z, c, idx, eps, max_mismatch_frac):
    """Every index that differs from the float64 argmin must be a near-tie.

    The scores ‖c‖² − 2z·c are formed from inputs rounded to the score dtype
    and rounded again on output, so each score is off by at most about
    (3/2)·ε·(‖z‖ + ‖c‖)² (ε: machine epsilon of the score dtype). A wrong pick
    therefore costs at most twice that; we allow 4·ε·(‖z‖ + ‖c‖)², with ‖c‖ the
    larger of the two codes' norms. A random wrong index violates this by
    orders of magnitude.
    """
    d64 = _sq_dist64(z, c)
    best = d64.argmin(dim=1)
    rows = torch.nonzero(idx.cpu() != best.cpu()).flatten().to(z.device)
    frac = rows.numel() / max(1, z.shape[0])
    if rows.numel() == 0:
        return frac
    chosen, optimal = idx[rows], best[rows]
    d_chosen, d_best = d64[rows, chosen], d64[rows, optimal]
    z_norm = z[rows].double().norm(dim=1)
    c_norm = torch.maximum(c[chosen].double().norm(dim=1), c[optimal].double().norm(dim=1))
    gap = d_chosen - d_best
    bound = 4 * eps * (z_norm + c_norm).square()
    worst = (gap / bound).max().item()
    worst_rel_gap = (gap / d_best.clamp(min=1e-300)).max().item()
    assert (gap >= 0).all()
    assert worst <= 1.0, (
        f"{rows.numel()} mismatches; largest gap is {worst:.3g}× the bound 4ε(‖z‖+‖c‖)², "
        f"largest relative gap (d_chosen − d_best)/d_best = {worst_rel_gap:.3g}"
    )
    assert frac <= max_mismatch_frac, f"{rows.numel()} mismatches ({frac:.2%}), largest relative gap {worst_rel_gap:.3g}"
    return frac


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,chunk", SHAPE_CHUNKS)
def test_matches_float64_reference(device, shape, chunk):
    z, c = _data(*shape, device=device)
    idx, sq_dist = nearest_codes(z, c, chunk_elements=chunk)

    assert idx.dtype == torch.long and idx.shape == (shape[0],) and idx.device == z.device
    assert sq_dist.dtype == z.dtype and sq_dist.shape == (shape[0],)
    _check_near_ties(z, c, idx, eps=torch.finfo(torch.float32).eps, max_mismatch_frac=0.002)
    expected = _sq_dist64(z, c).gather(1, idx[:, None]).squeeze(1)
    torch.testing.assert_close(sq_dist.double(), expected, rtol=1e-5, atol=1e-5)
    # Without the distances (a quantizer's search): the same indices, over one tile or many.
    indices, none = nearest_codes(z, c, chunk_elements=chunk, distances=False)
    assert none is None and torch.equal(indices, idx)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_inputs_are_searched_in_float64(device):
    z, c = _data(1000, 512, 64, device=device)
    idx, sq_dist = nearest_codes(z.double(), c.double(), chunk_elements=1000)
    assert sq_dist.dtype == torch.float64
    d64 = _sq_dist64(z, c)
    torch.testing.assert_close(idx, d64.argmin(dim=1))
    torch.testing.assert_close(sq_dist, d64.min(dim=1).values, rtol=1e-12, atol=1e-12)


def _skip_unless_half_matmul(device, dtype):
    # Independent of the implementation's own probe: try the matmul here.
    x = torch.ones(2, 2, device=device, dtype=dtype)
    try:
        torch.addmm(x[0], x, x.T)
    except RuntimeError as err:
        pytest.skip(f"torch {torch.__version__} cannot run a {dtype} addmm on {device}: {err}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", sorted(HALF))
# scale=1000 puts code norms far above 256, where ‖c‖² overflows fp16 (max
# 65504) unless the implementation rescales before casting.
@pytest.mark.parametrize("scale", [1.0, 1000.0])
# chunk 10 < K = 33 exercises code blocks (with a ragged last one) in half.
@pytest.mark.parametrize("shape,chunk", [((1000, 512, 64), 5000), ((4096, 1024, 32), 1 << 16), ((257, 33, 7), 10)])
def test_half_precision_only_differs_at_near_ties(device, precision, scale, shape, chunk):
    dtype = HALF[precision]
    _skip_unless_half_matmul(device, dtype)
    z, c = _data(*shape, device=device, scale=scale)
    idx, sq_dist = nearest_codes(z, c, precision=precision, chunk_elements=chunk)

    # Huh et al. (2023) A.1: half precision only for the search; the chosen
    # code is looked up in full precision, so sq_dist is a float32 distance.
    _check_near_ties(z, c, idx, eps=torch.finfo(dtype).eps, max_mismatch_frac=0.05)
    assert sq_dist.dtype == torch.float32
    expected = _sq_dist64(z, c).gather(1, idx[:, None]).squeeze(1)
    torch.testing.assert_close(sq_dist.double(), expected, rtol=1e-5, atol=1e-5 * scale**2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [100, 1 << 24])
def test_cosine_matches_float64_argmax_of_cosine(device, precision, chunk):
    _skip_unless_half_matmul(device, torch.bfloat16)
    z, c = _data(800, 300, 16, device=device, seed=1)
    z = torch.nn.functional.normalize(z, dim=1)
    c = torch.nn.functional.normalize(c, dim=1)
    idx, sq_dist = nearest_codes(z, c, metric="cosine", precision=precision, chunk_elements=chunk)

    cos64 = z.double() @ c.double().T
    best = cos64.argmax(dim=1)
    chosen_cos, best_cos = cos64.gather(1, idx[:, None]), cos64.gather(1, best[:, None])
    # For unit vectors ‖z − c‖² = 2 − 2cos, so the euclidean near-tie bound
    # 4ε(‖z‖+‖c‖)² = 16ε translates to a cosine gap of at most 8ε.
    eps = torch.finfo(torch.float32 if precision == "fp32" else torch.bfloat16).eps
    assert ((best_cos - chosen_cos) <= 8 * eps).all(), (best_cos - chosen_cos).max().item()
    assert (idx != best).float().mean().item() <= (0.002 if precision == "fp32" else 0.05)
    torch.testing.assert_close(sq_dist.double(), (2 - 2 * chosen_cos).squeeze(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_cosine_normalises_internally(device):
    z, c = _data(500, 64, 8, device=device, seed=2)
    lengths_z = torch.rand(500, 1, generator=torch.Generator().manual_seed(3)).to(device) * 10 + 0.1
    lengths_c = torch.rand(64, 1, generator=torch.Generator().manual_seed(4)).to(device) * 10 + 0.1
    unit_z = torch.nn.functional.normalize(z, dim=1)
    unit_c = torch.nn.functional.normalize(c, dim=1)
    idx, sq_dist = nearest_codes(z * lengths_z, c * lengths_c, metric="cosine")
    unit_idx, unit_sq_dist = nearest_codes(unit_z, unit_c, metric="cosine")
    assert torch.equal(idx, unit_idx)
    torch.testing.assert_close(sq_dist, unit_sq_dist)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1 << 24])
def test_exact_ties_go_to_lowest_index(device, chunk):
    # Small integers: every score is exact, so duplicated codes tie exactly,
    # whatever the block boundaries.
    g = torch.Generator().manual_seed(5)
    base = torch.randint(-3, 4, (3, 4), generator=g).float()
    codebook = torch.cat([base, base, base]).to(device)  # code j == code j+3 == code j+6
    z = torch.randint(-3, 4, (200, 4), generator=g).float().to(device)
    idx, _ = nearest_codes(z, codebook, chunk_elements=chunk)
    d64 = _sq_dist64(z, codebook)
    # First index attaining the minimum, found independently of argmin.
    is_min = d64 == d64.min(dim=1, keepdim=True).values
    first = torch.arange(9, device=device).expand(200, 9).masked_fill(~is_min, 9).min(dim=1).values
    assert torch.equal(idx, first)
    assert (idx < 3).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pure_and_not_differentiable(device, precision):
    z, c = _data(300, 40, 6, device=device, seed=6)
    z.requires_grad_(True)
    c.requires_grad_(True)
    z_before, c_before = z.detach().clone(), c.detach().clone()
    for metric in ("euclidean", "cosine"):
        idx, sq_dist = nearest_codes(z, c, metric=metric, precision=precision, chunk_elements=100)
        assert not idx.requires_grad and not sq_dist.requires_grad
        assert sq_dist.grad_fn is None
    assert torch.equal(z.detach(), z_before) and torch.equal(c.detach(), c_before)
    assert z.grad is None and c.grad is None


def test_autocast_does_not_lower_fp32_precision():
    # Under autocast the default precision must still search in float32.
    z, c = _data(1000, 512, 64, device="cpu", seed=7)
    expected = nearest_codes(z, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_codes(z, c)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_empty_batch():
    idx, sq_dist = nearest_codes(torch.empty(0, 3), torch.randn(4, 3), precision="bf16")
    assert idx.shape == (0,) and sq_dist.shape == (0,)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precision": "fp8"}, "precision"),
        ({"metric": "manhattan"}, "metric"),
        ({"chunk_elements": 0}, "chunk_elements"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nearest_codes(torch.randn(4, 3), torch.randn(5, 3), **kwargs)


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="N×D"):
        nearest_codes(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="dtype"):
        nearest_codes(torch.randn(4, 3), torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        nearest_codes(torch.randn(4, 3), torch.randn(0, 3))


def test_unsupported_half_matmul_is_a_clear_value_error(monkeypatch):
    monkeypatch.setattr(mqvae.nn.search, "_half_matmul_supported", lambda device, dtype: False)
    with pytest.raises(ValueError, match="cannot run a torch.float16 matmul on device cpu"):
        nearest_codes(torch.randn(4, 3), torch.randn(5, 3), precision="fp16")


@pytest.mark.parametrize("n,k,d,chunk", [(1, 1, 1, 1), (257, 33, 7, 10), (4096, 1024, 32, 100), (1 << 20, 16384, 64, 1 << 20),
                                         (1 << 14, 1024, 256, 1 << 20), (5000, 3, 512, 1 << 24), (10, 16384, 64, 1 << 24)])
def test_tiles_stay_within_the_chunk(n, k, d, chunk):
    rows, codes = mqvae.nn.search._block_shape(n, k, d, chunk)
    assert 1 <= rows <= n and 1 <= codes <= k
    assert rows * codes <= max(chunk, 1)
    assert rows <= max(1, chunk // d)
    # The matmul is never thinner than it has to be: short row blocks only when the chunk (or N) forces them.
    assert rows >= min(n, mqvae.nn.search.MIN_BLOCK_ROWS, chunk, max(1, chunk // d), max(1, chunk // k))
