"""Hypergradients of an upper level through a lower level's one-step best response.

A method is a function ``fn(vector, context)`` that returns the implicit term: one tensor per upper parameter,
added to the direct term by the caller. ``vector`` is v, the gradient of the upper loss with respect to the
lower parameters at their post-step values; ``context`` (``HypergradientContext``) is everything else a method
may use: the pre-step lower parameters, xi, alpha, the loss closures and the purity guard. A method needs to
know nothing of the levels (``problems``) that build the context. ``register_hypergradient(name, fn)`` makes it
selectable as ``hypergradient.type: name``.

Every method runs inside ``context.pure_evaluation()``: BatchNorm uses batch statistics as in every other
evaluation of L, and its running statistics are restored bit-for-bit afterwards; no quantizer maintenance runs
(the quantizer's forward has none), and the lower parameters are restored bit-for-bit.

Betty looks methods up in ``betty.hypergradient.jvp_fn_mapping`` by the lower level's ``Config.type`` and calls
``(vector, curr, prev, sync)``, ``curr`` being the lower level and ``prev`` the upper one; the registry adapts
that call: it asks the lower level for the context (``curr.hypergradient_context(prev)``), runs the method, and
in sync mode (which Betty sets on the last path at each gradient-accumulation boundary, so in
ordinary runs) adds the result to the upper parameters' ``.grad`` itself. Betty's own
methods (darts, neumann, cg, sama) keep Betty's signature; they are wrapped only to run purely.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
from betty.hypergradient import jvp_fn_mapping
from torch import nn

from mqvae.runtime import distributed
from mqvae.runtime.perf import phase
from mqvae.registry import HYPERGRADIENT_TRAITS, HYPERGRADIENTS

Tensors = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class TentativeStep:
    """One tentative step of the lower level that the hypergradient looks through: w_j = step(w_{j-1}) on batch b_j.

    ``loss`` evaluates L on b_j at the lower parameters' current values, ``upper_loss`` the same L restricted to the
    terms whose gradient with respect to the upper parameters can be nonzero (cheaper, e.g. no decoder when the task
    loss cannot reach the codebook)."""

    pre_step: Tensors  # w_{j-1}: the lower parameters before the step, the point Eq. 13 perturbs
    xi: float  # Eq. 10's xi for this step (the tentative step's learning rate unless set)
    loss: Callable[[], torch.Tensor]
    upper_loss: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class HypergradientContext:
    """What a hypergradient method sees of one lower level below one upper level, for one step of the upper level.

    ``lower`` are the live lower parameters (φ, θ), at their post-step values (φ', θ'): a method may write them in
    place, ``pure_evaluation`` puts them back. ``steps`` are the lower level's tentative steps since the upper
    level's last step, oldest first: one (Eq. 10), or k with ``hypergradient.unroll_steps: k`` (MQ-VAE §4.2); empty
    before the first. ``pre_step``, ``xi``, ``loss`` and ``upper_loss`` are those of the latest step, which is all a
    one-step method reads; a method that looks through all k is registered with ``unroll_steps=True``.
    """

    lower: Tensors
    upper: Tensors
    alpha: float  # Eq. 13's finite-difference radius: eps = alpha / ||v||
    steps: tuple[TentativeStep, ...]
    pure_evaluation: Callable[[], ContextManager[None]]

    @property
    def pre_step(self) -> Optional[Tensors]:
        """The lower parameters before the latest tentative step (φ, θ); None before the first."""
        return self.steps[-1].pre_step if self.steps else None

    @property
    def xi(self) -> float:
        return self._latest().xi

    @property
    def loss(self) -> Callable[[], torch.Tensor]:
        return self._latest().loss

    @property
    def upper_loss(self) -> Callable[[], torch.Tensor]:
        return self._latest().upper_loss

    def _latest(self) -> TentativeStep:
        if not self.steps:
            raise RuntimeError("the lower level has not taken a tentative step yet")
        return self.steps[-1]


def batch_norm_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The running statistics (and ``num_batches_tracked``) of every BatchNorm in ``model``."""
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


class PureEvaluation:
    """A context manager factory that restores ``tensors`` bit-for-bit after the block.

    For a hypergradient the tensors are the lower parameters and the model's BatchNorm buffers. BatchNorm stays in
    training mode: the perturbed passes must evaluate the same L as v and the direct term (Eq. 13 differentiates one
    function), and those use batch statistics; only the running statistics that the passes update as a side effect
    are put back. The saved copies are allocated once and refilled on every entry. Entering it again inside the
    block is a no-op (the outer block restores everything).
    """

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self._saved = [torch.empty_like(t) for t in self.tensors]
        self._active = False

    @contextmanager
    def __call__(self):
        if self._active:
            yield
            return
        with torch.no_grad():
            torch._foreach_copy_(self._saved, self.tensors)
        self._active = True
        try:
            yield
        finally:
            self._active = False
            with torch.no_grad():
                torch._foreach_copy_(self.tensors, self._saved)


def grads_or_zeros(loss, params):
    """grad of ``loss`` with respect to each of ``params``; zeros where it does not reach one."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def mqvae(vector, context: HypergradientContext) -> list[torch.Tensor]:
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

    k unrolled steps (``hypergradient.unroll_steps``, MQ-VAE §4.2: "multiple steps can be unrolled"): the lower
    level took w_j = w_{j-1} - xi_j grad_w L_j(w_{j-1}, C) on batches b_1..b_k, and the implicit term is the
    reverse-mode recursion through them, each step's second derivatives by Eq. 13's central difference (the DARTS
    recursion). From v_k = v, for j = k, ..., 1, with eps_j = alpha / ||v_j||:

        implicit += -xi_j [grad_C L_j(w_{j-1} + eps_j v_j) - grad_C L_j(w_{j-1} - eps_j v_j)] / (2 eps_j)
        v_{j-1}   = v_j - xi_j [grad_w L_j(w_{j-1} + eps_j v_j) - grad_w L_j(w_{j-1} - eps_j v_j)] / (2 eps_j)

    v_{j-1} = (dw_j/dw_{j-1})^T v_j, dw_j/dw_{j-1} = I - xi_j H_j: one pair of passes gives both differences. The
    first step (j = 1) needs only the codebook's (``upper_loss``); k = 1 is Eq. 13 as above. Like Eq. 13, it takes
    each step as SGD at lr xi_j, whatever the optimizer (docs/design.md).
    """
    if not context.steps:
        raise RuntimeError("hypergradient mqvae: Eq. 13 perturbs the pre-step parameters, but the lower level has "
                           "not taken a tentative step yet")
    params, uppers = context.lower, context.upper
    implicit = None
    for j in reversed(range(len(context.steps))):
        step, first = context.steps[j], j == 0
        # The norm stays on the device: no host sync in the hot loop.
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(vector)))
        eps = context.alpha / (norm + 1e-12)
        with torch.no_grad():
            move_by = torch._foreach_mul(vector, eps)  # eps v
        wrt, loss = (uppers, step.upper_loss) if first else (uppers + params, step.loss)
        grads = []
        for move in (torch._foreach_add_, torch._foreach_sub_):  # w + eps v, then w - eps v
            with torch.no_grad():
                torch._foreach_copy_(params, step.pre_step)
                move(params, move_by)
            grads.append(grads_or_zeros(loss(), wrt))
        terms = torch._foreach_sub(grads[0], grads[1])
        torch._foreach_mul_(terms, -step.xi / (2 * eps))
        term = terms[:len(uppers)]
        implicit = term if implicit is None else torch._foreach_add(implicit, term)
        if not first:
            # -xi_j H_j v_j; data-parallel, the global batch's (the mean of the ranks'), as v itself is (run_method)
            curvature = terms[len(uppers):]
            distributed.average_(curvature)
            vector = torch._foreach_add(vector, curvature)
    return implicit


def direct(vector, context: HypergradientContext) -> list[torch.Tensor]:
    """Ablation: no implicit term; the upper level steps on grad_C L(phi', theta', C) alone (look-ahead only)."""
    return [torch.zeros_like(p) for p in context.upper]


# What ``hypergradient.type`` may name (mqvae.registry.HYPERGRADIENTS): the methods registered here.
TYPES = HYPERGRADIENTS


def register_hypergradient(name: str, fn, *, unroll_steps: bool = False, graph_safe: bool = False) -> None:
    """Make ``fn(vector, context) -> implicit term`` selectable as ``hypergradient.type: name``.

    ``fn`` receives v and a ``HypergradientContext`` and returns one tensor per ``context.upper`` tensor; it runs
    inside ``context.pure_evaluation()``, so whatever it writes into ``context.lower`` is put back afterwards.
    ``unroll_steps=True`` says that ``fn`` looks through every step of ``context.steps``; a config with
    ``hypergradient.unroll_steps`` > 1 may name only such a method (one that reads the latest step alone would
    silently look through the last of the k steps). ``graph_safe=True`` says that ``fn`` keeps to what a CUDA graph
    replays (no host read, every number that changes a device tensor: docs/design.md, section 4); ``perf.cuda_graphs``
    refuses any other method. Add a mode with it to ``tests/test_cuda_graphs.py`` to have that checked.
    """
    def run(vector, curr, prev, sync):
        context = curr.hypergradient_context(prev)
        with phase(f"hypergradient.{name}"), context.pure_evaluation():
            implicit = fn(vector, context)
        if sync:  # Betty's sync mode (ordinary runs): the term goes into the upper parameters' .grad here
            prev.set_grads(prev.trainable_parameters(), implicit)
            return None
        return implicit

    jvp = functools.wraps(fn)(functools.partial(run_method, name, run))

    TYPES.add(name, fn)
    HYPERGRADIENT_TRAITS[name] = {"unroll_steps": unroll_steps, "graph_safe": graph_safe}  # (mqvae.config.schema)
    jvp_fn_mapping[name] = jvp


# -- Betty's own methods -----------------------------------------------------------------------------------------
# They stay selectable as ablations (``darts`` is SAMA-style: it perturbs the post-step parameters and has no xi), with
# Betty's signature ``(vector, curr, prev, sync)`` and Betty's ``Config.darts_alpha``; they are wrapped so that their
# perturbed evaluations are pure as well.


# An upper level's hypergradients that run_method checks: a method whose implicit term is exactly zero in each of
# them reduces to ``direct``. Not only the first: Betty's sama preconditions with the lower optimizer's state and gives
# exactly zero at the first step alone.
WATCHED_STEPS = 5
# upper level -> (its hypergradients checked so far, a flag on the device: each of them was exactly zero), or None
# once all WATCHED_STEPS are checked.
_WATCHED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def run_method(name: str, run, vector, curr, prev, sync):
    """Run the method ``name`` (``run``, Betty's signature) on v averaged over data-parallel ranks. When an upper
    level's first ``WATCHED_STEPS`` implicit terms are all exactly zero, tell the level: the method then reduces to
    ``direct`` at a higher cost, as Betty's neumann and cg do under the plain straight-through estimator. Whether
    they were is a flag on the device, handed to the level's ``flagged_warnings`` after the last of those steps,
    which the engine reads at a logging step (reading it here would make every watched step wait for the device).
    In Betty's sync mode checking copies the upper gradients, in those steps only."""
    # Data-parallel: v is the gradient of the global batch's loss, so eps = alpha / ||v|| is the same on every rank;
    # each rank's implicit term is then its share, averaged with the direct term before the step (Level).
    vector = list(vector)
    distributed.average_([v for v in vector if v is not None])
    watched = _WATCHED.get(prev, (0, None))
    if name == "direct" or watched is None:
        return run(vector, curr, prev, sync)
    params = prev.trainable_parameters()
    before = [None if p.grad is None else p.grad.clone() for p in params] if sync else None
    implicit = run(vector, curr, prev, sync)
    if implicit is None:  # sync mode: the term went into .grad
        zero = _all([_same(b, p.grad) for b, p in zip(before, params)])
    else:
        zero = _all([term.any().logical_not() for term in implicit if term is not None])
    steps, zero_so_far = watched
    zero_so_far = zero if zero_so_far is None else zero_so_far & zero
    _WATCHED[prev] = (steps + 1, zero_so_far) if steps + 1 < WATCHED_STEPS else None
    if steps + 1 == WATCHED_STEPS:
        prev.flagged_warnings.append((zero_so_far,
            f"hypergradient.type {name}: the implicit term of level '{prev.name}' through level '{curr.name}' was "
            f"exactly zero in each of its first {WATCHED_STEPS} steps, so the run equals hypergradient.type: direct at a "
            "higher cost (e.g. neumann and cg differentiate by autograd, and with a plain straight-through estimator "
            "sg[.] blocks that mixed derivative; Eq. 13's finite difference, type: mqvae, sees through it)"))
    return implicit


def _all(flags: list[torch.Tensor]) -> torch.Tensor:
    """Whether every one of ``flags`` (0-dim bool tensors on one device) is true, as such a tensor (true for none)."""
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)


def _same(before, after) -> torch.Tensor:
    """Whether a gradient is unchanged (None counting as zeros), as a 0-dim bool tensor on its device."""
    if before is None or after is None:
        tensors = [t for t in (before, after) if t is not None]
        return _all([t.any().logical_not() for t in tensors])
    return (before == after).all()


def _zeros_for(prev, sync):
    zeros = [torch.zeros_like(p) for p in prev.trainable_parameters()]
    if sync:
        prev.set_grads(prev.trainable_parameters(), zeros)
        return None
    return zeros


def _zero_when_unreachable(fn):
    """Betty's implicit-function methods (neumann, cg) differentiate grad_phi L with respect to the upper
    parameters by autograd. With a plain straight-through estimator that mixed derivative is identically
    zero (sg[z_e] blocks it) and autograd reports the codebook as unused; the exact answer is a zero implicit
    term, which is what this returns (``run_method`` reports it). (MQ-VAE's finite difference does see
    through the stop-gradient.)"""

    @functools.wraps(fn)
    def wrapper(vector, curr, prev, sync):
        try:
            return fn(vector, curr, prev, sync)
        except RuntimeError as exc:
            if "not have been used in the graph" not in str(exc) and "does not require grad" not in str(exc):
                raise
            return _zeros_for(prev, sync)

    return wrapper


def _register_betty_method(name: str) -> None:
    original = getattr(jvp_fn_mapping[name], "betty_method", jvp_fn_mapping[name])  # (a module reload wraps once)
    fn = original if name in ("darts", "sama") else _zero_when_unreachable(original)

    def run(vector, curr, prev, sync):
        with phase(f"hypergradient.{name}"), curr.hypergradient_context(prev).pure_evaluation():
            return fn(vector, curr, prev, sync)

    jvp = functools.wraps(fn)(functools.partial(run_method, name, run))
    jvp.betty_method = original
    TYPES.add(name, original)
    jvp_fn_mapping[name] = jvp


BETTY_TYPES = ("darts", "neumann", "cg", "sama")
for _name in BETTY_TYPES:
    _register_betty_method(_name)
register_hypergradient("mqvae", mqvae, unroll_steps=True, graph_safe=True)
register_hypergradient("direct", direct, unroll_steps=True, graph_safe=True)
