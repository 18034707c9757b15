"""Hypergradients of an upper level through a lower level's one-step best response.

Betty looks these up in ``betty.hypergradient.jvp_fn_mapping`` by the lower
level's ``Config.type`` and calls ``fn(vector, curr, prev, sync)``: ``vector``
is the upper loss's gradient with respect to the lower (``curr``) parameters,
``prev`` is the upper level. The function returns the implicit term to add to
the upper level's gradient, or, when ``sync`` is set, adds it to the upper
parameters' ``.grad`` itself (Betty's distributed path).

Every function here runs its perturbed evaluations purely (``pure_evaluation``):
BatchNorm uses batch statistics as in every other evaluation of L, and its
running statistics are restored bit-for-bit; no quantizer maintenance runs (the
quantizer's forward has none), and the lower parameters are restored
bit-for-bit.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from betty.hypergradient import jvp_fn_mapping
from torch import nn

from .perf import phase


@contextmanager
def pure_evaluation(level):
    """Restore ``level``'s parameters and the model's BatchNorm statistics bit-for-bit afterwards.

    BatchNorm stays in training mode: the perturbed passes must evaluate the same L as v and the direct
    term (Eq. 13 differentiates one function), and those use batch statistics. Only the running statistics
    (and ``num_batches_tracked``) that the passes update as a side effect are put back.
    """
    model = getattr(level, "model", level.module)
    if getattr(level, "_batch_norm_buffers", None) is None:  # the module tree is fixed: walk it once per level
        level._batch_norm_buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                                     for b in m.buffers()]
    params = level.trainable_parameters()
    state = params + level._batch_norm_buffers
    saved = _buffers_like(level, "_purity_buffers", state)
    with torch.no_grad():
        torch._foreach_copy_(saved, state)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(state, saved)


def _buffers_like(level, name: str, params) -> list[torch.Tensor]:
    """One set of parameter-shaped buffers per level and purpose, allocated on first use and refilled by the
    caller every step (no per-step allocation)."""
    buffers = getattr(level, name, None)
    if buffers is None or len(buffers) != len(params) or any(b.shape != p.shape or b.dtype != p.dtype for b, p in zip(buffers, params)):
        buffers = [torch.empty_like(p) for p in params]
        setattr(level, name, buffers)
    return buffers


def _grads_or_zeros(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _deliver(implicit, prev, sync):
    if sync:
        prev.set_grads(prev.trainable_parameters(), implicit)
        return None
    return implicit


def mqvae(vector, curr, prev, sync):
    """MQ-VAE Eq. 13: the implicit term of the one-step-unrolled hypergradient (Eq. 10-12).

    The tentative step that produced the post-step parameters (phi', theta') is the lower level's own
    optimizer step, as in Betty and the authors' code; with SGD at learning rate xi it is exactly
    Eq. 10's phi - xi * grad_phi L. ``vector`` is v = grad_{phi',theta'} L(phi', theta', C). Eq. 13
    perturbs the *pre-step* parameters: phi+- = phi +- eps v, theta+- = theta +- eps v, eps = alpha/||v||,
    and the implicit term is -xi [grad_C L(phi+, theta+, C) - grad_C L(phi-, theta-, C)] / (2 eps).
    Perturbing phi and theta together equals the paper's two separate differences to O(eps^2) at half
    the passes.

    The finite difference sees through stop-gradients: grad_C L_codebook = 2(C_k - z_e) changes when
    phi moves, although autograd's mixed derivative through sg[z_e] is zero. That is the intended
    behaviour of Eq. 13 (it is how L_task reaches the codebook, MQ-VAE §4.3).
    """
    params, pre, uppers = curr.trainable_parameters(), curr.pre_step_parameters, prev.trainable_parameters()
    # The norm stays on the device: no host sync in the hot loop.
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(vector)))
    eps = curr.fd_alpha / (norm + 1e-12)
    step = _buffers_like(curr, "_fd_step_buffers", params)
    with torch.no_grad():
        torch._foreach_copy_(step, vector)
        torch._foreach_mul_(step, eps)  # eps v
    grads = []
    for move in (torch._foreach_add_, torch._foreach_sub_):  # phi + eps v, then phi - eps v
        with torch.no_grad():
            torch._foreach_copy_(params, pre)
            move(params, step)
        grads.append(_grads_or_zeros(curr.hypergradient_loss(curr.cur_batch, prev), uppers))
    implicit = torch._foreach_sub(grads[0], grads[1])
    torch._foreach_mul_(implicit, -curr.xi / (2 * eps))
    return _deliver(implicit, prev, sync)


def direct(vector, curr, prev, sync):
    """Ablation: no implicit term; the upper level steps on grad_C L(phi', theta', C) alone (look-ahead only)."""
    return _deliver([torch.zeros_like(p) for p in prev.trainable_parameters()], prev, sync)


def _zero_when_unreachable(fn):
    """Betty's implicit-function methods (neumann, cg) differentiate grad_phi L with respect to the upper
    parameters by autograd. With a plain straight-through estimator that mixed derivative is identically
    zero (sg[z_e] blocks it) and autograd reports the codebook as unused; the exact answer is a zero implicit
    term, which is what this returns. (MQ-VAE's finite difference does see through the stop-gradient.)"""

    @functools.wraps(fn)
    def wrapper(vector, curr, prev, sync):
        try:
            return fn(vector, curr, prev, sync)
        except RuntimeError as exc:
            if "not have been used in the graph" not in str(exc) and "does not require grad" not in str(exc):
                raise
            return _deliver([torch.zeros_like(p) for p in prev.trainable_parameters()], prev, sync)

    return wrapper


def _pure(name, fn):
    if getattr(fn, "runs_purely", False):
        return fn

    @functools.wraps(fn)
    def wrapper(vector, curr, prev, sync):
        with phase(f"hypergradient.{name}"), pure_evaluation(curr):
            return fn(vector, curr, prev, sync)

    wrapper.runs_purely = True
    return wrapper


def register_hypergradient(name: str, fn) -> None:
    """Make ``fn(vector, curr, prev, sync)`` selectable as ``hypergradient.type: name``."""
    jvp_fn_mapping[name] = _pure(name, fn)


# Betty's own methods stay selectable as ablations (``darts`` is SAMA-style: it perturbs the post-step
# parameters and has no xi); they are wrapped so that their perturbed evaluations are pure as well.
BETTY_TYPES = ("darts", "neumann", "cg", "sama")
for _name in BETTY_TYPES:
    _fn = jvp_fn_mapping[_name]
    register_hypergradient(_name, _fn if _name in ("darts", "sama") else _zero_when_unreachable(_fn))
register_hypergradient("mqvae", mqvae)
register_hypergradient("direct", direct)
