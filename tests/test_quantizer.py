"""The quantizer family against independent references.

Every number here is checked against something the code under test does not compute: float64 hand
formulas (MQ-VAE Eq. 4-6, Huh et al. 2023 Eq. 11 / A.2, Eq. 21, Eq. 38-45), brute-force nearest
codes, or autograd on a separate hand-built graph. Every gradient path is a stated fact: the table
GRADIENT_PATHS says, for each mode and each loss term, which parameter sets receive gradient.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch

from helpers import float64, tiny_engine  # noqa: F401  (float64: a fixture)
from mqvae.config import QuantizerConfig, load_config
from mqvae.errors import UserError
from mqvae.method.models import build_quantizer
from mqvae.nn.quantizers import GumbelQuantizer, QuantizerOutput, VectorQuantizer, from_vectors
from mqvae.nn.quantizers.affine import VAR_EPS
from mqvae.nn.quantizers.vq import REPLACE_NOISE, UNMAINTAINED_FORWARDS

K, D = 16, 8  # codes, latent channels
ROOT = Path(__file__).resolve().parents[1]

MODES = {
    "plain": {},
    "sync": {"sync_nu": 0.5},
    "affine_learned": {"affine": "learned"},
    "affine_learned_sync": {"affine": "learned", "sync_nu": 0.5, "affine_lr": 3.0},
    "affine_ema": {"affine": "ema"},
    "l2": {"l2": True},
    "group": {"groups": 2},
    "group_sync": {"groups": 2, "sync_nu": 0.5},
    "replace": {"replace_freq": 2},
    "mlp": {"codebook_mlp": [6], "kmeans_init": False},
    "mlp_sync": {"codebook_mlp": [6], "kmeans_init": False, "sync_nu": 0.5},
    "gumbel": {"kind": "gumbel", "kmeans_init": False},
}

# Which parameter sets get a non-zero gradient from which loss term. ν = 0: the task loss never
# reaches the codebook; ν > 0: it does (Huh Eq. 21). The learned affine parameters are reached by
# whatever reaches the codes, and so are the MLP of the hyper-net codebook and its input embedding (stored under
# "codebook"). The EMA affine map has no parameters (buffers). Gumbel-VQ: the task
# reaches everything, the KL term only the logits (z_e and the projection).
_PLAIN = {"task": {"z_e"}, "commitment": {"z_e"}, "codebook": {"codebook"}}
_SYNC = {"task": {"z_e", "codebook"}, "commitment": {"z_e"}, "codebook": {"codebook"}}
GRADIENT_PATHS = {
    "plain": _PLAIN,
    "sync": _SYNC,
    "affine_learned": {"task": {"z_e"}, "commitment": {"z_e"}, "codebook": {"codebook", "affine"}},
    "affine_learned_sync": {"task": {"z_e", "codebook", "affine"}, "commitment": {"z_e"},
                            "codebook": {"codebook", "affine"}},
    "affine_ema": _PLAIN,
    "l2": _PLAIN,
    "group": _PLAIN,
    "group_sync": _SYNC,
    "replace": _PLAIN,
    "mlp": {"task": {"z_e"}, "commitment": {"z_e"}, "codebook": {"codebook", "mlp"}},
    "mlp_sync": {"task": {"z_e", "codebook", "mlp"}, "commitment": {"z_e"}, "codebook": {"codebook", "mlp"}},
    "gumbel": {"task": {"z_e", "codebook", "projection"}, "kl": {"z_e", "projection"}},
}


def _z(b=2, h=3, w=3, seed=1, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, h, w, generator=g, dtype=torch.float64)


def _vec(z):
    """B×D×H×W -> N×D, written out here (not the library's helper)."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def make(mode: str, num_codes=K, dim=D, **extra):
    """A float64 quantizer in a non-trivial state: spread codes, non-identity affine maps, and
    running statistics already started."""
    cfg = QuantizerConfig(num_codes=num_codes, dim=dim, **{**MODES[mode], **extra})
    torch.manual_seed(0)
    q = build_quantizer(cfg).double()
    with torch.no_grad():
        q.codebook.copy_(torch.randn_like(q.codebook))
        if cfg.affine == "learned":  # scale = 1 + r·s, bias = r·t (Huh A.1)
            q.affine.s.copy_(0.3 * torch.randn_like(q.affine.s) / cfg.affine_lr)
            q.affine.t.copy_(0.2 * torch.randn_like(q.affine.t) / cfg.affine_lr)
    if cfg.affine == "ema" or cfg.replace_freq:
        z = _z(seed=7, d=dim)
        q.maintain(z, q(z).detached())
    return q


def param_sets(q) -> dict:
    sets = {"codebook": [q.codebook]}
    if isinstance(q, VectorQuantizer) and q.affine is not None:
        sets["affine"] = list(q.affine.parameters())
    if isinstance(q, VectorQuantizer) and q.codebook_mlp is not None:
        sets["mlp"] = list(q.codebook_mlp.parameters())
    if isinstance(q, GumbelQuantizer):
        sets["projection"] = list(q.proj.parameters())
    return sets


def reached(loss, tensors: dict) -> set:
    names = list(tensors)
    flat = [t for name in names for t in tensors[name]]
    grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
    hit, i = set(), 0
    for name in names:
        for _ in tensors[name]:
            if grads[i] is not None and grads[i].abs().sum() > 0:
                hit.add(name)
            i += 1
    return hit


# ---------------------------------------------------------------------------------------------
# 1. Gradient paths


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", list(MODES))
def test_gradient_paths(mode, training):
    q = make(mode).train(training)
    z_e = _z().requires_grad_(True)
    out = q(z_e)
    target = _z(seed=3)
    terms = {"task": 0.5 * (out.z_q - target).pow(2).sum(), **out.losses}
    tensors = {"z_e": [z_e], **param_sets(q)}
    table = {name: reached(loss, tensors) for name, loss in terms.items()}
    assert table == GRADIENT_PATHS[mode]
    # The property the hypergradient relies on says the same as the table.
    task_hits = table["task"] - {"z_e"}
    assert q.task_reaches_codebook == bool(task_hits)
    assert set(q.loss_weights()) == set(out.losses)


@pytest.mark.parametrize("mode", ["sync", "group_sync", "affine_learned_sync"])
def test_sync_codebook_gets_nu_times_task_gradient(mode):
    """Huh Eq. 21: the codes receive ν·∂L_task/∂z_q scatter-added onto the selected codes, and z_e
    still receives the plain STE gradient ∂L_task/∂z_q."""
    q = make(mode)
    nu = q.cfg.sync_nu
    z_e = _z().requires_grad_(True)
    out = q(z_e)
    weight = _z(seed=5)
    loss = (0.5 * weight * out.z_q.pow(2)).sum()  # ∂L/∂z_q = weight ⊙ z_q
    loss.backward()

    # Independent forward value and ∂L/∂z_q in float64, N×G×d.
    n, groups = out.indices.shape
    d = D // groups
    c = q.codebook.detach()
    if mode == "affine_learned_sync":
        r = q.cfg.affine_lr
        scale, bias = 1 + r * q.affine.s.detach()[0], r * q.affine.t.detach()[0]  # Huh A.1
        effective = c * scale + bias
    else:
        effective = c
    zq_hand = effective[out.indices]  # N×G×d
    g = _vec(weight).reshape(n, groups, d) * zq_hand
    per_code = torch.zeros(K, d, dtype=torch.float64).index_add_(0, out.indices.reshape(-1), g.reshape(-1, d))

    assert torch.allclose(z_e.grad, from_vectors(g.reshape(n, D), z_e), rtol=1e-12, atol=1e-12)
    if mode == "affine_learned_sync":
        # effective_k = (1 + r·s) ⊙ c_k + r·t: chain rule by hand.
        assert torch.allclose(q.codebook.grad, nu * scale * per_code, rtol=1e-12, atol=1e-12)
        assert torch.allclose(q.affine.s.grad[0], nu * r * (c * per_code).sum(0), rtol=1e-12, atol=1e-12)
        assert torch.allclose(q.affine.t.grad[0], nu * r * per_code.sum(0), rtol=1e-12, atol=1e-12)
    else:
        assert torch.allclose(q.codebook.grad, nu * per_code, rtol=1e-12, atol=1e-12)


def test_affine_learned_moves_codes_never_selected():
    """Huh §4.1 / A.9: unselected codes are updated through the shared affine parameters. The raw
    vector of an unselected code gets exactly zero gradient (it is not in the graph); its effective
    code c̃_j = scale ⊙ c_j + bias still moves, because the affine parameters s, t get gradient."""
    q = make("affine_learned", num_codes=64)
    z_e = _z(b=1, h=2, w=2)  # 4 vectors, 64 codes: most codes unselected
    out = q(z_e)
    unused = out.counts == 0
    assert unused.sum() >= 60
    out.losses["codebook"].backward()
    assert torch.equal(q.codebook.grad[unused], torch.zeros_like(q.codebook.grad[unused]))
    assert q.affine.s.grad.abs().min() > 0 and q.affine.t.grad.abs().min() > 0

    before = q.effective_codebook().detach().clone()
    with torch.no_grad():
        for p in q.parameters():
            p -= 0.1 * p.grad
    moved = (q.effective_codebook().detach() - before).norm(dim=1)
    assert (moved[unused] > 0).all()


def test_search_and_losses_match_brute_force():
    """Indices are the float64 brute-force nearest code within each group's own codebook slice, and the
    losses are MQ-VAE Eq. 4-5 as mean squared errors over all N·D entries."""
    for mode, metric in (("plain", "euclidean"), ("group", "euclidean"), ("l2", "cosine")):
        q = make(mode)
        z_e = _z()
        out = q(z_e)
        groups = q.cfg.groups
        d, per = D // groups, K // groups
        z = _vec(z_e).reshape(-1, groups, d)
        c = q.codebook.detach()
        if metric == "cosine":
            z, c = z / z.norm(dim=-1, keepdim=True), c / c.norm(dim=-1, keepdim=True)
        for g in range(groups):
            dist = ((z[:, g, None, :] - c[None, g * per:(g + 1) * per]) ** 2).sum(-1)
            assert torch.equal(out.indices[:, g], dist.argmin(1) + g * per)
        mse = ((z - c[out.indices]) ** 2).mean()
        assert torch.allclose(out.losses["commitment"], mse, rtol=1e-13)
        assert torch.allclose(out.losses["codebook"], mse, rtol=1e-13)
        assert torch.equal(out.counts, torch.bincount(out.indices.reshape(-1), minlength=K))


# ---------------------------------------------------------------------------------------------
# 2. Codebook loss + SGD = EMA (Huh Eq. 11, A.2)


def test_codebook_sgd_step_is_ema_update():
    """With Huh's β = 1 (only the codebook term moves codes; in this toolkit's keys: beta = 0,
    codebook_weight = w) one SGD step of rate η on w·L_codebook, L_codebook = mean over N·D entries of
    (sg[z_e] − c)², gives for every code k with n_k assigned vectors S_k

        ∂/∂c_k = w · 2/(N·D) · Σ_{i∈S_k} (c_k − z_i) = w · 2 n_k/(N·D) · (c_k − z̄_k)
        c_k ← (1 − γ_k) c_k + γ_k z̄_k,   γ_k = 2 η w n_k / (N·D)

    i.e. Eq. 11 with z_e^(t) the mean of the code's vectors and decay γ_k; η = γ N D / (2 w n_k) gives
    decay γ. (A.2's d = ½‖·‖² on one vector is n_k = 1, N·D → 1, no factor 2: γ = η.)"""
    cfg = QuantizerConfig(num_codes=4, dim=3, beta=0.0, codebook_weight=2.0)
    q = build_quantizer(cfg).double()
    codes = torch.tensor([[0.0, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5]], dtype=torch.float64)
    with torch.no_grad():
        q.codebook.copy_(codes)
    gen = torch.Generator().manual_seed(0)
    members = [0, 0, 0, 1, 2, 2]  # n = (3, 1, 2, 0): code 3 is never selected
    vectors = codes[members] + 0.3 * torch.randn(len(members), 3, generator=gen, dtype=torch.float64)
    z_e = vectors.T.reshape(1, 3, len(members), 1)  # B×D×H×W with N = 6
    n_total, dim, w = len(members), 3, cfg.codebook_weight

    gamma = 0.25
    lr = gamma * n_total * dim / (2 * w * 3)  # decay γ for code 0 (n_0 = 3)
    opt = torch.optim.SGD(q.parameters(), lr=lr)
    out = q(z_e)
    assert out.indices[:, 0].tolist() == members
    loss = sum(q.loss_weights()[name] * value for name, value in out.losses.items())
    loss.backward()
    opt.step()

    for k, n_k in enumerate((3, 1, 2, 0)):
        if n_k == 0:
            assert torch.equal(q.codebook[k], codes[k])
            continue
        mean_k = vectors[[i for i, m in enumerate(members) if m == k]].mean(0)
        gamma_k = 2 * lr * w * n_k / (n_total * dim)
        expected = (1 - gamma_k) * codes[k] + gamma_k * mean_k  # Huh Eq. 11
        assert torch.allclose(q.codebook[k].detach(), expected, rtol=1e-13, atol=1e-13)
    assert math.isclose(2 * lr * w * 3 / (n_total * dim), gamma)


# ---------------------------------------------------------------------------------------------
# 3. Maintenance: LRU replacement, k-means init, EMA affine statistics


def _counts(used, num_codes=8):
    c = torch.zeros(num_codes, dtype=torch.long)
    c[list(used)] = 3
    return c


@pytest.mark.parametrize("mode", ["plain", "group", "affine_learned"])
def test_lru_replaces_exactly_the_idle_codes_with_batch_vectors(mode):
    q = make(mode, num_codes=8, dim=4, replace_freq=3)
    with torch.no_grad():
        q.idle_iters.zero_()
    groups, d = q.cfg.groups, 4 // q.cfg.groups
    z_e = _z(b=2, h=4, w=4, d=4, seed=11)
    if groups == 2:  # make the two latent groups' sub-vectors far apart
        z_e[:, :2] += 20
        z_e[:, 2:] -= 20
    sub = _vec(z_e).reshape(-1, groups, d)

    # Usage per iteration and, by hand, the idle counts and the codes that must be replaced then.
    pattern = [({0, 1, 2}, [0, 0, 0, 1, 1, 1, 1, 1], set()),
               ({0, 1}, [0, 0, 1, 2, 2, 2, 2, 2], set()),
               ({0, 3}, [0, 1, 2, 0, 0, 0, 0, 0], {4, 5, 6, 7}),  # 4..7 reach 3 idle iterations
               ({0}, [0, 2, 0, 1, 1, 1, 1, 1], {2})]
    for used, idle, replaced in pattern:
        before = q.effective_codebook().detach().clone()
        raw_before = q.codebook.detach().clone()
        out = QuantizerOutput(torch.zeros(()), torch.zeros(0, groups, dtype=torch.long), {}, torch.ones(()), _counts(used))
        q.maintain(z_e, out)
        after = q.effective_codebook().detach()
        assert q.idle_iters.tolist() == idle
        changed = {k for k in range(8) if not torch.equal(q.codebook[k], raw_before[k])}
        assert changed == replaced
        for k in replaced:
            own = sub[:, k // (8 // groups)]  # the code's own latent group
            rel = (own - after[k]).norm(dim=1) / own.norm(dim=1)
            assert 0 < rel.min() <= REPLACE_NOISE * (math.sqrt(d) + 5)
            assert not torch.allclose(after[k], before[k])


def test_lru_with_a_real_forward_resets_used_codes():
    q = make("replace", replace_freq=5)
    with torch.no_grad():
        q.idle_iters.fill_(3)
    z = _z()
    out = q(z)
    q.maintain(z, out.detached())
    used = out.counts > 0
    assert (q.idle_iters[used] == 0).all() and (q.idle_iters[~used] == 4).all()


@pytest.mark.parametrize("mode", ["plain", "group", "affine_learned"])
def test_kmeans_init_keeps_num_codes_with_few_inputs(mode):
    q = make(mode)
    z_e = _z(b=1, h=1, w=5)  # 5 vectors for 16 codes (8 per latent group)
    q.initialize(z_e)
    assert q.codebook.shape == (K, D // q.cfg.groups) and q.num_codes == K
    eff = q.effective_codebook().detach()
    assert torch.isfinite(eff).all()
    assert torch.unique(eff, dim=0).shape[0] == K  # distinct codes
    groups, per = q.cfg.groups, K // q.cfg.groups
    sub = _vec(z_e).reshape(5, groups, -1)
    for g in range(groups):
        # every input sits (up to the re-use noise) on a code of its own group
        dist = torch.cdist(sub[:, g], eff[g * per:(g + 1) * per])
        assert (dist.min(1).values <= 1e-2 * sub[:, g].std()).all()


def test_kmeans_init_centres_are_effective_codes():
    """With an affine map the centres are what the inputs are compared with, not the raw codes."""
    from mqvae.nn.kmeans import kmeans_init

    q = make("affine_learned", dim=4)
    gen = torch.Generator().manual_seed(2)
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0], [0, 0, 0, 4]], dtype=torch.float64)
    x = centres.repeat(50, 1) + 0.1 * torch.randn(200, 4, generator=gen, dtype=torch.float64)
    z_e = x.T.reshape(1, 4, 200, 1)
    torch.manual_seed(5)
    q.initialize(z_e)
    torch.manual_seed(5)
    reference = kmeans_init(x, K, iters=q.cfg.kmeans_iters)
    assert torch.allclose(q.effective_codebook().detach(), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affine_groups,groups", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2)])
def test_ema_affine_statistics_match_huh_eq_38_45(affine_groups, groups):
    m = 0.3
    q = build_quantizer(QuantizerConfig(num_codes=K, dim=D, affine="ema", affine_groups=affine_groups,
                                        groups=groups, affine_momentum=m)).double()
    d = D // groups
    per_affine, per_latent = K // affine_groups, K // groups
    members = [sorted({k // per_latent for k in range(a * per_affine, (a + 1) * per_affine)})
               for a in range(affine_groups)]
    gen = torch.Generator().manual_seed(4)
    running = None
    for step in range(3):
        with torch.no_grad():  # stands in for an optimizer step on the codes
            q.codebook.copy_(0.1 * torch.randn(K, d, generator=gen, dtype=torch.float64) + step)
        z_e = 3 * _z(seed=20 + step) + 1.5
        q.maintain(z_e, q(z_e).detached())

        sub = _vec(z_e).reshape(-1, groups, d)
        c = q.codebook.detach().reshape(affine_groups, per_affine, d)
        batch = {
            "ze_mean": torch.stack([sub[:, mem].reshape(-1, d).mean(0) for mem in members]),
            "ze_var": torch.stack([((sub[:, mem].reshape(-1, d) - sub[:, mem].reshape(-1, d).mean(0)) ** 2).mean(0)
                                   for mem in members]),
            "code_mean": c.mean(1),
            "code_var": ((c - c.mean(1, keepdim=True)) ** 2).mean(1),
        }
        if running is None:
            running = batch  # the averages start at the first batch's moments
        else:
            running = {k: m * batch[k] + (1 - m) * running[k] for k in batch}  # Eq. 38-41
        for key, value in running.items():
            assert torch.allclose(getattr(q.affine, f"running_{key}"), value, rtol=1e-10, atol=1e-12), key

        # Eq. 43 (with μ_e as the shift): match the codes' running moments to z_e's.
        ratio = (running["ze_var"] / (running["code_var"] + VAR_EPS)).sqrt()
        expected = ratio[:, None] * (c - running["code_mean"][:, None]) + running["ze_mean"][:, None]
        assert torch.allclose(q.effective_codebook().detach(), expected.reshape(K, d), rtol=1e-10, atol=1e-12)
        # The forward's z_q: each vector's nearest of these codes, within its latent group's slice of the codebook.
        effective = expected.reshape(K, d)
        z_q = _vec(q(z_e).z_q).reshape(-1, groups, d)
        for g in range(groups):
            codes = effective[g * per_latent:(g + 1) * per_latent]
            nearest = ((sub[:, g, None] - codes[None]) ** 2).sum(-1).argmin(1)
            assert torch.allclose(z_q[:, g], codes[nearest], rtol=1e-10, atol=1e-12)


def test_ema_affine_is_identity_until_first_update():
    q = build_quantizer(QuantizerConfig(num_codes=K, dim=D, affine="ema")).double()
    assert torch.equal(q.effective_codebook(), q.codebook)


def _forwards(q, n: int) -> tuple[list[str], QuantizerOutput | None]:
    """The maintain() warnings of ``n`` forwards of ``q`` (every one Python lets through), and the last output."""
    z, out = _z(), None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            out = q(z)
    return [str(w.message) for w in caught if "maintain()" in str(w.message)], out


@pytest.mark.parametrize("mode, maintains", [("replace", True), ("affine_ema", True), ("plain", False),
                                             ("affine_learned", False), ("group_sync", False)])
def test_a_quantizer_never_maintained_warns_once(mode, maintains):
    q = make(mode)
    assert _forwards(q, UNMAINTAINED_FORWARDS - 1)[0] == []
    told, _ = _forwards(q, UNMAINTAINED_FORWARDS + 1)  # the UNMAINTAINED_FORWARDS-th forward, then as many more
    if maintains:
        assert len(told) == 1 and "call quantizer.maintain(z_e.detach(), out.detached())" in told[0], told
    else:  # nothing to maintain: nothing to say
        assert told == []
    # The count is no state: a checkpoint of the quantizer is the same, and loads into a fresh one.
    fresh = make(mode)
    assert q.state_dict().keys() == fresh.state_dict().keys()
    fresh.load_state_dict(q.state_dict())


def test_maintenance_and_evaluation_forwards_keep_the_warning_away():
    q = make("replace")
    told, out = _forwards(q, UNMAINTAINED_FORWARDS - 1)
    q.maintain(_z(), out.detached())
    told += _forwards(q, UNMAINTAINED_FORWARDS - 1)[0]
    q.eval()  # evaluation needs no maintenance
    told += _forwards(q, UNMAINTAINED_FORWARDS)[0]
    assert told == []
    q.train()  # the count since maintain() went on: this is its UNMAINTAINED_FORWARDS-th training forward
    assert len(_forwards(q, 1)[0]) == 1


def test_the_count_does_not_recompile_a_compiled_quantizer():
    """Under torch.compile the forward does not count: the graph would read the count as a constant and guard on
    it, so that each new value compiled the forward again."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    q, frames = make("replace"), CompileCounter()
    compiled, z = torch.compile(q, backend=frames), _z()
    compiled(z)
    first = frames.frame_count
    for _ in range(3):
        compiled(z)
    torch._dynamo.reset()
    assert first >= 1 and frames.frame_count == first


# ---------------------------------------------------------------------------------------------
# 4. Purity: forward changes no parameter and no buffer


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", list(MODES))
def test_forward_is_pure(mode, training):
    q = make(mode).train(training)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z_e = _z().requires_grad_(True)
    for _ in range(2):
        q(z_e)
    after = q.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ---------------------------------------------------------------------------------------------
# 5. The forward value of z_q is exactly the chosen codes


@pytest.mark.parametrize("mode", ["plain", "group", "l2", "sync", "affine_learned", "affine_ema", "gumbel"])
def test_z_q_is_exactly_the_chosen_effective_codes(mode):
    q = make(mode).eval()
    z_e = _z()
    out = q(z_e)
    # (N, G) global indices -> N x D: the chosen effective codes of the groups side by side
    chosen = q.effective_codebook().detach()[out.indices].reshape(out.indices.shape[0], D)
    assert torch.equal(_vec(out.z_q), chosen)
    if mode in ("plain", "group", "gumbel"):  # and by hand: rows of the codebook, groups side by side
        by_hand = q.codebook.detach()[out.indices].reshape(out.indices.shape[0], D)
        assert torch.equal(_vec(out.z_q), by_hand)
    if mode == "l2":
        c = q.codebook.detach()
        assert torch.allclose(_vec(out.z_q), (c / c.norm(dim=1, keepdim=True))[out.indices[:, 0]], rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# Gumbel-VQ specifics


def test_gumbel_kl_and_modes():
    q = make("gumbel")
    z_e = _z()
    logits = q.proj(_vec(z_e)).detach()
    p = torch.softmax(logits, dim=1)
    kl = (p * torch.log(p * K)).sum(1).mean()  # KL(q ‖ uniform)
    out = q(z_e)
    assert torch.allclose(out.losses["kl"], kl, rtol=1e-12)
    assert q.loss_weights() == {"kl": q.cfg.gumbel_kl_weight}
    # Training: a relaxed sample, z_q in the convex hull of the codes; the noise is the global RNG's.
    torch.manual_seed(3)
    a = q.train()(z_e)
    torch.manual_seed(3)
    b = q(z_e)
    assert torch.equal(a.z_q, b.z_q)
    # Eval: the most likely code, deterministic, no random numbers drawn.
    q.eval()
    state = torch.get_rng_state()
    e = q(z_e)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(e.indices[:, 0], logits.argmax(1))


# ---------------------------------------------------------------------------------------------
# Configuration: validation, optimizer groups, the shipped configs


@pytest.mark.parametrize("keys,named", [
    ({"kind": "gumbel", "kmeans_init": False, "affine": "learned"}, ["quantizer.affine", "quantizer.kind"]),
    ({"kind": "gumbel", "kmeans_init": False, "sync_nu": 0.2}, ["quantizer.sync_nu", "quantizer.kind"]),
    ({"kind": "gumbel", "kmeans_init": False, "replace_freq": 20}, ["quantizer.replace_freq"]),
    ({"kind": "gumbel", "kmeans_init": False, "l2": True}, ["quantizer.l2"]),
    ({"kind": "gumbel", "kmeans_init": False, "groups": 2}, ["quantizer.groups"]),
    ({"kind": "gumbel", "kmeans_init": True}, ["quantizer.kmeans_init"]),
    ({"groups": 3, "num_codes": 16, "dim": 6}, ["quantizer.groups", "quantizer.num_codes"]),
    ({"affine_groups": 2}, ["quantizer.affine_groups", "quantizer.affine"]),
    ({"affine": "learned", "affine_groups": 3}, ["quantizer.affine_groups", "quantizer.num_codes"]),
    ({"affine": "ema", "affine_groups": 16}, ["quantizer.affine_groups", "quantizer.affine"]),
    ({"affine": "ema", "affine_lr": 10.0}, ["quantizer.affine_lr", "quantizer.affine"]),
    ({"codebook_mlp": [8]}, ["quantizer.kmeans_init", "quantizer.codebook_mlp", "kmeans_init: false"]),
    ({"codebook_mlp": [8], "kmeans_init": False, "replace_freq": 20}, ["quantizer.replace_freq", "quantizer.codebook_mlp"]),
    ({"kind": "gumbel", "kmeans_init": False, "codebook_mlp": [8]}, ["quantizer.codebook_mlp", "quantizer.kind"]),
    ({"kind": "gumbel", "kmeans_init": False, "gumbel_anneal_iters": 10}, ["quantizer.gumbel_anneal_iters",
                                                                          "quantizer.gumbel_temperature_final"]),
    ({"gumbel_temperature_final": 0.5}, ["quantizer.gumbel_temperature_final", "kind: gumbel"]),
    ({"gumbel_anneal_iters": 10}, ["quantizer.gumbel_anneal_iters", "kind: gumbel"]),
    ({"gumbel_straight_through": True}, ["quantizer.gumbel_straight_through", "kind: gumbel"]),
])
def test_meaningless_combinations_are_user_errors(keys, named):
    cfg = QuantizerConfig(**{"num_codes": K, "dim": D, **keys})
    with pytest.raises(UserError) as info:
        build_quantizer(cfg)
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in named)


def test_param_groups_are_one_group_of_the_codebook_and_the_affine_parameters():
    # affine_lr acts inside the map (Huh A.1), so the affine parameters need no group, nor lr, of their own.
    q = make("affine_learned", affine_lr=10.0)
    (only,) = q.param_groups()
    assert list(only) == ["params"] and only["params"] == [q.codebook, q.affine.s, q.affine.t]
    plain = make("plain")
    (only,) = plain.param_groups()
    assert list(only) == ["params"] and only["params"] == [plain.codebook]


@pytest.mark.parametrize("name,expected,train", [
    ("replace", {"replace_freq": 20}, {}),
    ("group", {"groups": 2}, {}),
    ("l2", {"l2": True}, {}),
    ("affine", {"affine": "learned", "affine_lr": 10.0}, {}),
    ("sync", {"sync_nu": 0.2}, {}),
    # Gumbel-VQ learns more slowly: four times the iterations (gumbel.yaml says why).
    ("gumbel", {"kind": "gumbel", "kmeans_init": False, "gumbel_anneal_iters": 4000}, {"iters": 8000}),
])
def test_baseline_configs_differ_from_vqvae_only_in_the_quantizer(name, expected, train):
    base = load_config(ROOT / "configs/digits/vqvae.yaml")
    cfg = load_config(ROOT / f"configs/digits/{name}.yaml")
    for section in ("data", "model", "levels", "hypergradient", "perf"):
        assert getattr(cfg, section) == getattr(base, section), section
    assert cfg.train == dataclasses.replace(base.train, **train)
    for key, value in expected.items():
        assert getattr(cfg.quantizer, key) == value
    q = build_quantizer(cfg.quantizer)
    assert q.num_codes == cfg.quantizer.num_codes


# ---------------------------------------------------------------------------------------------
# The learned affine map (Huh A.1): scale = 1 + r·s, bias = r·t, stepped by the level's own optimizer

AFFINE_LR, LEVEL_LR, QUANTIZER_LR, AFFINE_DECAY = 10.0, 1e-3, 2e-3, 0.1
# A start away from the identity, scales on both sides of 1 (0.5 to 1.5) and biases on both sides of 0.
OFF_IDENTITY_S = torch.linspace(-0.05, 0.05, 8, dtype=torch.float64).reshape(2, 4)
OFF_IDENTITY_T = torch.linspace(0.03, -0.03, 8, dtype=torch.float64).reshape(2, 4)


class _ReferenceAffine(torch.nn.Module):
    """scale ⊙ c + bias per affine group, with scale and bias themselves the leaves, written here: it gives the
    gradient with respect to (scale, bias) without the code's parameterization."""

    def __init__(self, scale: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.scale, self.bias = torch.nn.Parameter(scale.clone()), torch.nn.Parameter(bias.clone())

    def forward(self, codes):
        grouped = codes.reshape(self.scale.shape[0], -1, codes.shape[1])
        return (grouped * self.scale[:, None] + self.bias[:, None]).reshape(codes.shape)


def _affine_step(tmp_path, optimizer: str, weight_decay: float, start: tuple | None):
    """One step of a VQ-VAE level (codebook_lr: QUANTIZER_LR) with a learned affine map in 2 affine groups, built
    from a config as a run builds it, from ``start`` = (s, t) (None: as built). Returns the engine's (scale, bias)
    before and after the step, the gradient of the level's loss with respect to (scale, bias) at the start, and the
    engine's affine map."""
    level = {"name": "vqvae", "problem": "VQVAE", "optimizer": optimizer, "lr": LEVEL_LR, "weight_decay": weight_decay,
             "params": {"codebook_lr": QUANTIZER_LR}, **({"momentum": 0.0} if optimizer == "sgd" else {})}
    engine = tiny_engine(tmp_path, levels=[level], data={"name": "digits64", "batch_size": 16},
                         quantizer={"affine": "learned", "affine_lr": AFFINE_LR, "affine_groups": 2})
    affine = engine.model.quantizer.affine
    with torch.no_grad():
        if start is not None:
            affine.s.copy_(start[0])
            affine.t.copy_(start[1])
        # Effective codes spread over the encoder's outputs, so that codes of both affine groups are selected (as
        # after k-means init) and both groups' parameters get gradient.
        z_e = engine.model.encoder(engine.datasets.train.tensors[0][:64]).movedim(1, -1).reshape(-1, 4)
        picked = z_e[torch.randperm(len(z_e), generator=torch.Generator().manual_seed(0))[:16]]
        engine.model.quantizer.codebook.copy_(affine.invert(picked))
    s0, t0 = start if start is not None else (torch.zeros(2, 4), torch.zeros(2, 4))
    before = [x.detach().clone() for x in affine.scale_bias()]
    reference = copy.deepcopy(engine.model)
    reference.quantizer.affine = _ReferenceAffine(1 + AFFINE_LR * s0, AFFINE_LR * t0)  # Huh A.1
    engine.train_step()
    loss = reference.loss(engine.vqvae.cur_batch)["loss"]
    grads = torch.autograd.grad(loss, [reference.quantizer.affine.scale, reference.quantizer.affine.bias])
    assert all(g.abs().min() > 0 for g in grads)
    return before, [x.detach() for x in affine.scale_bias()], grads, affine


@pytest.mark.parametrize("start", [None, (OFF_IDENTITY_S, OFF_IDENTITY_T)], ids=["identity", "off_identity"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_learned_affine_step_is_the_optimizer_step_on_s_and_t(tmp_path, float64, optimizer, start):
    """The affine parameters s, t take the plain step of the optimizer group they are in (the quantizer's, at
    codebook_lr), on their gradient r·∂L/∂scale, r·∂L/∂bias; the map follows as scale = 1 + r·s, bias = r·t. So
    under SGD the scale moves by lr·r² times its gradient, and AdamW's decay pulls s, t to 0."""
    _, (scale, bias), (grad_scale, grad_bias), affine = _affine_step(tmp_path, optimizer, AFFINE_DECAY, start)
    s0, t0 = start if start is not None else (torch.zeros(2, 4), torch.zeros(2, 4))
    r, lr = AFFINE_LR, QUANTIZER_LR

    def step(p, g):  # torch's first step of each optimizer, by its formula (AdamW: betas 0.9, 0.999, eps 1e-8)
        if optimizer == "sgd":
            return p - lr * (g + AFFINE_DECAY * p)
        return p * (1 - lr * AFFINE_DECAY) - lr * g / (g.abs() + 1e-8)

    s1, t1 = step(s0, r * grad_scale), step(t0, r * grad_bias)  # chain rule through scale = 1 + r·s, bias = r·t
    torch.testing.assert_close(scale, 1 + r * s1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bias, r * t1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(affine.s.detach(), s1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(affine.t.detach(), t1, rtol=1e-12, atol=1e-12)


def test_weight_decay_pulls_the_learned_affine_map_toward_the_identity(tmp_path, float64):
    """AdamW, from a map away from the identity: the decay alone (the difference of one step with and without it)
    moves the scale toward 1 and the bias toward 0 by lr·decay of their distance, whatever the gradient and
    whatever r, measured on the engine's own map (no formula of the test's)."""
    start = (OFF_IDENTITY_S, OFF_IDENTITY_T)
    (scale0, bias0), (scale, bias), _, _ = _affine_step(tmp_path / "decay", "adamw", AFFINE_DECAY, start)
    _, (free_scale, free_bias), _, _ = _affine_step(tmp_path / "free", "adamw", 0.0, start)
    assert (scale0 - 1).abs().min() > 0 and bias0.abs().min() > 0  # away from the identity in every entry
    pull = QUANTIZER_LR * AFFINE_DECAY
    torch.testing.assert_close(scale - free_scale, -pull * (scale0 - 1), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(bias - free_bias, -pull * bias0, rtol=1e-9, atol=1e-15)
