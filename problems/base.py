"""The base of every level: a Betty ``ImplicitProblem`` that trains one part of a shared model.

All levels evaluate the same loss (MQ-VAE Eq. 6, the model's ``loss``); a level differs from another only in
the parameters it trains, the batches it sees and its optimizer. Subclasses say which part of the model they
train (``module_of``) and may override the loss (``loss_terms``).

``Level.step`` is one training iteration, MQ-VAE Algorithm 1 in the paper's order. Beside ``Level``,
``FastRollBack`` is an opt-in speed-up of Algorithm 1's roll-back that ``engines.build`` attaches to a level
that rolls back; a level without it rolls back as Betty does, with the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
from betty.hypergradient import get_grads, jvp_fn_mapping
from betty.problems import ImplicitProblem

from mqvae.runtime import distributed
from mqvae.method.hypergradients import (HypergradientContext, PureEvaluation, TentativeStep, batch_norm_buffers,
                                         grads_or_zeros)
from mqvae.runtime.perf import phase


def in_phase(label: str):
    """Run the decorated Level method inside the profiler region ``<level name>.<label>`` (``mqvae.runtime.perf.phase``)."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            with phase(f"{self.name}.{label}"):
                return method(self, *args, **kwargs)

        return wrapper

    return decorate


@dataclasses.dataclass
class TentativeStepRecord:
    """What a level keeps of one of its tentative steps for the levels above it (``TentativeStep``'s source): the
    parameters before the step (a buffer refilled every window), the step's lr and its batch (set after the step)."""

    pre_step: list[torch.Tensor]
    xi: float
    batch: tuple | None


class Level(ImplicitProblem):
    """One level of the problem: a part of the model (``module_of``), its loss (``loss_terms``), its batches
    (``data``) and its optimizer. ``step`` is one training iteration (MQ-VAE Algorithm 1); the hypergradient of
    a level above through this level's step sees this level through ``hypergradient_context``.

    The contract of a new level kind (a subclass registered with ``problems.register_problem``, named by its
    class name in ``levels.*.problem``):

    - ``module_of(cls, model, params)`` (required, a classmethod): the ``nn.Module`` whose parameters the level
      trains, a part of the shared ``model`` (``mqvae.nn.networks.QuantizedNetwork``: ``encoder``, ``quantizer``,
      ``decoder``) or a new module of the level's own (``CommitmentWeight``'s rho). Built once; the level's
      optimizer trains its parameters that require a gradient.
    - ``Params`` (optional): a dataclass of the level's own settings, given in the config as
      ``levels.*.params`` and validated with the rest of the config (unknown keys get a did-you-mean; declare
      ranges with ``mqvae.config.spec``). The instance is ``self.params`` and ``module_of``'s ``params``.
    - ``loss_terms(self, batch)`` (optional; default MQ-VAE Eq. 6, ``model.loss``): a dict of tensors. ``loss``
      (a scalar) is required: the level descends on it, and the hypergradients of levels above differentiate
      it. Every other one-element tensor is logged as ``<level name>.<key>`` in log.jsonl. ``_out`` is reserved:
      the model's forward output that ``model.loss`` returns, which the engine takes (and removes) for the
      quantizer's maintenance; keep it when you extend ``model.loss``'s terms. The function must be pure (no
      state changes): Betty's methods and Eq. 13 evaluate it at perturbed parameters.
    - ``provided_weights(self)`` (optional): loss weights this level learns for the levels below it (a dict of
      tensors, e.g. ``{"commitment": beta}``); a level below reads them with ``loss_weights()``.
    - ``learned_scalars`` (optional, a class attribute): names of ``loss_terms`` entries that are learned
      scalars, which curves.png plots, each in a panel titled "learned" where the level's trained parameters
      reach the value in autograd's graph (``learned``); a scheduled or constant value, which they do not reach,
      is plotted as not learned.
    - ``scheduled_steps(cls, steps, params)`` (optional, a classmethod): the length of its lr schedule when the level
      kind skips some of the steps the level graph gives it (``Discriminator``: those before its disc_start).
    - ``begin_iteration(self, step)`` (optional): told the iteration before each iteration's steps, for a level kind
      whose behaviour depends on it; a loss must not read a counter that steps advance mid-iteration.
    - Reserved: a level's name may not be an attribute of its class or of the engine
      (``engines.build.reserved_names``: Betty makes every level an attribute of the engine and of the others
      under its name); ``levels.*.params`` may not hold a key its ``Params`` lacks.
    """

    @dataclasses.dataclass
    class Params:
        """No settings of its own: ``levels.*.params`` must be empty."""

    # The terms of loss_terms that are scalars this level learns (logged as <level>.<term>): curves.png gives each
    # a panel of its own. The other terms are losses and the batch perplexity.
    learned_scalars: tuple[str, ...] = ()
    # Whether the level trains the prior of a ``prior.run`` config (``Prior``): a prior config has such levels only,
    # and other configs none (engines.build checks it).
    trains_prior = False

    def __init__(self, name, config, module, optimizer, scheduler, train_data_loader, *, model, level_cfg, xi=0.0,
                 alpha=0.01, inner_steps=1, data="train", fast_roll_back: "FastRollBack | None" = None,
                 mutual=False):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader)
        self.model = model
        self.level_cfg = level_cfg
        self.params = level_cfg.params  # an instance of this class's Params (mqvae.config validated it)
        # Eq. 10's xi and Eq. 13's finite-difference radius alpha, which the hypergradient of this level's best
        # response uses when this level sits below another (hypergradient_context). xi=None (the config's
        # ``xi: null``) is the learning rate the tentative step really uses, re-read every iteration so that
        # it follows warm-up and cosine schedules (remember_pre_step).
        self.xi_follows_lr = xi is None
        self.xi = level_cfg.lr if xi is None else xi
        self.alpha = alpha
        # hypergradient.inner_steps (Huh Table 10): the optimizer steps this level takes per iteration, each on its
        # 1/k of the batch (inner_step_descent). engines.build gives k > 1 only to the level that steps first in
        # alternated optimization (xi = 0), the codebook in the shipped configs.
        self.inner_steps = inner_steps
        # The config's ``levels.*.data``, resolved by engines.build: "train" or "holdout" (the level's own batch
        # stream) or "shared" (the batch of the first level below it, get_batch).
        self.data = data
        self.fast_roll_back = fast_roll_back
        # hypergradient.mutual (MQ-VAE‡): the iteration is mutual_step; each side's state before its tentative step
        # is kept here to undo that step.
        self.mutual = mutual
        self._tentative_state = StateCache() if mutual else None
        self.last_stats: dict = {}
        # The losses of the steps since the engine last noted them (LevelEngine.note_finite): this iteration's only,
        # not a level's earlier loss that it did not replace (a level that steps every k-th iteration).
        self.new_losses: list[torch.Tensor] = []
        # The learned_scalars that the level's first step found its trained parameters to reach (a value that only
        # follows a schedule is not learned); None before that step. Kept in checkpoints (progress_state).
        self.learned: set[str] | None = None
        self.last_forward = None  # (z_e, quantizer output) of the latest real step, for quantizer maintenance
        self._keeps_forward: bool | None = None  # (keeps_forward)
        self.stream = train_data_loader
        # perf.cuda_graphs: the static slots that get_batch hands out (engines.graphs); None in eager mode.
        self.staged: StagedBatches | None = None
        self._trainable: list[torch.Tensor] | None = None
        # The tentative steps of this level that the levels above look through: one, or hypergradient.unroll_steps
        # = k of them (Betty's unroll_steps: the levels above step after every k-th step of this level). The j-th
        # holds w_{j-1}, the lr xi_j of step j and its batch b_j (remember_pre_step, _end_step).
        self._unroll: list[TentativeStepRecord] = []
        self._purity: PureEvaluation | None = None
        # Optimizer steps in a row, now and at most, whose gradient was zero in every parameter: on the device,
        # read by the engine at logging steps only (zero_gradient_steps).
        self._zero_run: torch.Tensor | None = None
        self._longest_zero_run: torch.Tensor | None = None
        # Warnings met inside the level's step (e.g. by a hypergradient method), for the engine to report once.
        self.warnings: list[str] = []
        # (flag, warning): a warning that holds where the flag, a 0-dim bool tensor on the device, is true (e.g. a
        # hypergradient that was exactly zero in its first steps). The engine reads the flags at logging steps and
        # before checkpoints only: deciding them in the step would make it wait for the device.
        self.flagged_warnings: list[tuple[torch.Tensor, str]] = []
        # An upper level's direct and implicit terms of its latest step, kept by reference so that the Fig. 6
        # quantities cost nothing until a logging step asks for them (hypergradient_stats). Nothing writes them in
        # place: the implicit term is added to .grad as a new tensor, and the implicit term is the level's copy.
        self._direct: list | None = None
        self._terms: tuple[list, list] | None = None

    # -- what the level trains --------------------------------------------------------------
    @classmethod
    def module_of(cls, model, params) -> torch.nn.Module:
        """The part of ``model`` whose parameters this level trains; ``params`` is the level's ``Params``."""
        raise NotImplementedError

    @classmethod
    def scheduled_steps(cls, steps: int, params) -> int:
        """The length of the level's lr schedule, given the ``steps`` the level graph lets it take in train.iters
        iterations: all of them, unless the level kind skips some (``Discriminator`` before its disc_start)."""
        return steps

    def begin_iteration(self, step: int) -> None:
        """Called by the engine before each iteration's steps, with the iteration (from 1), for level kinds whose
        behaviour depends on it (``Discriminator``)."""

    def periodic_from(self) -> int:
        """The first iteration from which the level's iterations repeat with its window (``perf.cuda_graphs``
        captures none before it, engines.graphs): 1, unless the level kind starts later (``Discriminator``)."""
        return 1

    def param_groups(self):
        """Optimizer parameter groups. A quantizer trained by this level may ask for its own groups, which get
        ``quantizer_lr``."""
        params = self.trainable_parameters()
        quantizer = getattr(self.model, "quantizer", None)
        if quantizer is None or not hasattr(quantizer, "param_groups") or not self._trains(quantizer):
            return [{"params": params}]
        groups = [{"params": list(g["params"]), "lr": self.quantizer_lr()} for g in quantizer.param_groups()]
        owned = {id(p) for g in groups for p in g["params"]}
        rest = [p for p in params if id(p) not in owned]
        return ([{"params": rest}] if rest else []) + [g for g in groups if g["params"]]

    def quantizer_lr(self) -> float:
        """The learning rate of the quantizer's groups: the level's, unless a level kind has its own setting
        (``VQVAE.Params.codebook_lr``)."""
        return self.level_cfg.lr

    def patch_scheduler(self):
        # Betty rebuilds LambdaLR with one lr_lambda per group of the optimizer it was first given; a level's
        # rebuilt optimizer may have more groups (the quantizer's, param_groups), which all follow the level's schedule.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.scheduler.lr_lambdas[0])

    def patch_module(self):
        # Betty's distributed strategy wraps the module in DistributedDataParallel, whose reducer averages gradients
        # only in a backward that follows a forward through the wrapper; every level evaluates the shared model
        # directly, and the hypergradients take gradients with torch.autograd.grad, which DDP never sees. So the
        # module stays as it is, starts from rank 0's values, and take_optimizer_step averages the gradients.
        self.module.to(self.device)
        distributed.broadcast_([*self.module.parameters(), *self.module.buffers()])

    def patch_data_loader(self, loader):
        # Betty's distributed strategy would shard with its DistributedBatchSampler (which duplicates the last batch
        # and mishandles fewer batches than ranks); the level's BatchStream shards itself, and resumes exactly.
        return loader

    def patch_optimizer(self):
        # Betty rebuilds the optimizer as ``cls(params, **optimizer.defaults)``; on current torch AdamW's defaults
        # hold keys its constructor does not take (``decoupled_weight_decay``), so keep only accepted ones.
        cls = type(self.optimizer)
        accepted = inspect.signature(cls.__init__).parameters
        self.optimizer = cls(self.param_groups(), **{k: v for k, v in self.optimizer.defaults.items() if k in accepted})

    def trainable_parameters(self):
        # Betty and the hypergradients ask for this list many times per iteration (36 times in a digits MQ-VAE
        # iteration, 48 with roll-back), and walking the module tree costs ~38 us each time: ~5 % of a digits
        # step (0.2 % at the paper shape). A level's parameter set is fixed once it is built (freeze parameters
        # before building the engine); the list is a copy, so callers cannot alter it.
        if self._trainable is None:
            self._trainable = [p for p in self.module.parameters() if p.requires_grad]
        return list(self._trainable)

    def _trains(self, part: torch.nn.Module | None) -> bool:
        """Whether this level's module contains ``part``."""
        return part is not None and any(m is part for m in self.module.modules())

    def keeps_forward(self) -> bool:
        """Whether ``get_loss`` keeps the forward of each step (``last_forward``): only where the engine's quantizer
        maintenance reads it, on a level that trains the encoder, with a quantizer that maintains (fixed once built;
        the detached copies are three operations per step)."""
        if self._keeps_forward is None:
            quantizer = getattr(self.model, "quantizer", None)
            self._keeps_forward = (quantizer is not None and quantizer.maintains
                                   and self._trains(getattr(self.model, "encoder", None)))
        return self._keeps_forward

    # -- the loss -------------------------------------------------------------------------------
    def loss_weights(self) -> dict:
        """Loss weights this level's loss takes from the levels above it (e.g. a learned beta)."""
        weights = {}
        for upper in self._parents:
            weights.update(upper.provided_weights())
        return weights

    def provided_weights(self) -> dict:
        """Loss weights this level learns for the levels below it."""
        return {}

    def loss_terms(self, batch) -> dict:
        """MQ-VAE Eq. 6 on ``batch``: the total under ``loss`` and each term by name, all tensors."""
        return self.model.loss(batch, weights=self.loss_weights())

    def step_terms(self, batch) -> dict:
        """The loss terms this level's own steps descend on (``get_loss``): ``loss_terms``, unless a level kind
        knows a cheaper loss with the same gradient (``Codebook`` in alternated optimization)."""
        return self.loss_terms(batch)

    def training_step(self, batch):
        # Betty's own hypergradient methods call this at perturbed parameters; it must stay pure.
        return self.loss_terms(batch)["loss"]

    def hypergradient_loss(self, batch, upper) -> torch.Tensor:
        """This level's loss, restricted to what the gradient with respect to ``upper``'s parameters needs.

        With a plain straight-through estimator the task loss cannot reach the codebook, so the
        codebook's gradient needs only the model's ``quantization_terms``: the decoder forward of the
        finite-difference passes would be wasted (docs/design.md, Cost model: the passes an iteration needs).
        Measured saving: 14-18 % of an MQ-VAE step on digits (batch 64), 11-13 % at the paper shape (batch 32).
        A level with a loss of its own (``loss_terms`` overridden) is differentiated whole: the shortcut knows
        only the default loss.
        """
        if upper.module is getattr(self.model, "quantizer", None) and self._codebook_needs_encoder_only():
            return self.model.quantization_terms(batch)["loss"]
        return self.training_step(batch)

    def _codebook_needs_encoder_only(self) -> bool:
        """Whether this level's loss reaches the quantizer only through ``quantization_terms``: its loss is the
        default Eq. 6 (not a level's own ``loss_terms``), with the quantizer's own weights, under plain STE."""
        quantizer = getattr(self.model, "quantizer", None)
        return (quantizer is not None and hasattr(self.model, "encoder") and not quantizer.task_reaches_codebook
                and not self.loss_weights() and type(self).loss_terms is Level.loss_terms)

    def hypergradient_context(self, upper) -> HypergradientContext:
        """What the hypergradient of ``upper`` through this level's step may use (``mqvae.method.hypergradients``)."""
        if self._purity is None:  # the parameters and the module tree are fixed once built
            self._purity = PureEvaluation(self.trainable_parameters() + batch_norm_buffers(self.model))

        def step(record, batch):
            return TentativeStep(pre_step=tuple(record.pre_step), xi=record.xi,
                                 loss=lambda: self.training_step(batch),
                                 upper_loss=lambda: self.hypergradient_loss(batch, upper))

        # The steps of the current window so far (all k when the level above steps); the latest on cur_batch.
        records = self._unroll[:self._unroll_index() + 1]
        batches = [record.batch for record in records[:-1]] + [self.cur_batch]
        return HypergradientContext(
            lower=tuple(self.trainable_parameters()),
            upper=tuple(upper.trainable_parameters()),
            alpha=self.alpha,
            steps=tuple(step(record, batch) for record, batch in zip(records, batches)),
            pure_evaluation=self._purity,
        )

    def _unroll_index(self) -> int:
        """The index, in its window of ``unroll_steps``, of the level's latest step (Betty counts steps from 1)."""
        return (self._count - 1) % self._unroll_steps

    # -- checkpoints -------------------------------------------------------------------------------
    def progress_state(self) -> dict:
        """What a checkpoint needs of the level beyond its module, optimizer, schedule and batch stream, so that a
        run resumed inside a gradient-accumulation window continues exactly: Betty's step count (where the window
        stands), the gradients accumulated so far (None where there are none), and what the next logging step
        reports of a level that has not stepped since: its loss terms, the Fig. 6 terms of its latest
        hypergradient and which of its learned_scalars it learns (``learned``, for curves.png)."""
        def detached(tensors):
            return [None if t is None else t.detach() for t in tensors]

        # Inside a window of hypergradient.unroll_steps: the steps taken so far, which the levels above will look
        # through, and with roll-back the state the window started from.
        taken = self._count % self._unroll_steps if self._parents else 0
        unroll = [{"pre_step": detached(record.pre_step), "xi": record.xi, "batch": detached(record.batch)}
                  for record in self._unroll[:taken]]
        return {"count": self._count, "grads": detached(p.grad for p in self.trainable_parameters()),
                "unroll": unroll, "roll_back_state": self._roll_back_state() if taken and self._roll_back else None,
                "last_stats": dict(self.last_stats),
                "learned": None if self.learned is None else sorted(self.learned),
                "hypergradient_terms": None if self._terms is None else
                {"direct": detached(self._terms[0]), "implicit": detached(self._terms[1])}}

    def load_progress_state(self, state: dict) -> None:
        """``progress_state``'s inverse; a ValueError names what does not fit this level's parameters."""
        params = self.trainable_parameters()

        def placed(tensors, what):
            if len(tensors) != len(params):
                raise ValueError(f"{what} of level '{self.name}': {len(tensors)} tensors for {len(params)} parameters")
            for t, p in zip(tensors, params):
                if t is not None and t.shape != p.shape:
                    raise ValueError(f"{what} of level '{self.name}': shape {tuple(t.shape)} for a parameter of "
                                     f"shape {tuple(p.shape)}")
            return [None if t is None else t.to(device=p.device, dtype=p.dtype) for t, p in zip(tensors, params)]

        grads = placed(state["grads"], "accumulated gradients")
        terms = state["hypergradient_terms"]
        self._terms = None if terms is None else (placed(terms["direct"], "direct term"),
                                                  placed(terms["implicit"], "implicit term"))
        self._count = state["count"]
        # (Betty's flag: whether the next step starts a window, which caches the state to roll back to.)
        self._inner_loop_start = self._count % (self._unroll_steps * self.gas) == 0
        self._unroll = [TentativeStepRecord(placed(record["pre_step"], "unrolled step"), record["xi"],
                                            tuple(t.to(self.device) for t in record["batch"]))
                        for record in state.get("unroll", [])]  # (absent from checkpoints written before k-step unrolls)
        if state.get("roll_back_state") is not None:
            self.fast_roll_back.states.load_state_dict(self, state["roll_back_state"])
        self.last_stats = {key: value.to(self.device) for key, value in state["last_stats"].items()}
        learned = state.get("learned")  # (absent from checkpoints written before it was saved)
        self.learned = None if learned is None else set(learned)
        for p, g in zip(params, grads):
            p.grad = g

    def remember_pre_step(self) -> None:
        """Keep the parameters (phi, theta) before the tentative step, which Eq. 13 perturbs, and xi."""
        params = self.trainable_parameters()
        index = self._unroll_index()
        while len(self._unroll) <= index:
            self._unroll.append(TentativeStepRecord([torch.empty_like(p) for p in params], self.xi, None))
        record = self._unroll[index]
        record.batch = None
        if self.xi_follows_lr:
            # The lr the coming optimizer step uses. Betty steps the scheduler right after the tentative step,
            # before the upper level computes Eq. 13, so it must be read now. The first group holds the
            # level's own parameters at the level's lr (later groups are the quantizer's, at quantizer_lr).
            lr = self.optimizer.param_groups[0]["lr"]
            if torch.is_tensor(lr):
                # (perf.cuda_graphs: the lr is on the device, mqvae.method.optim.DeviceSchedule.) Copied into the
                # record's own tensor, in place, as the pre-step parameters are.
                if not (torch.is_tensor(record.xi) and record.xi.device == lr.device):  # (or as a checkpoint left it)
                    record.xi = torch.empty_like(lr)
                record.xi.copy_(lr)
            else:
                record.xi = lr
            self.xi = record.xi
        with torch.no_grad():
            torch._foreach_copy_(record.pre_step, params)

    def _roll_back_state(self) -> dict:
        """The state a window of unrolled steps started from, which the roll-back restores (for a checkpoint)."""
        if self.fast_roll_back is None:
            raise RuntimeError(f"level '{self.name}': a checkpoint inside a window of unrolled steps with roll-back "
                               "needs the level's FastRollBack (engines.build attaches it)")
        return self.fast_roll_back.states.state_dict(self)

    # -- one iteration: MQ-VAE Algorithm 1 --------------------------------------------------------
    def step(self, global_step=None):
        """One training iteration; Betty's engine calls it on every lowest level (``Engine.train_step``).

        From the lowest level it is MQ-VAE Algorithm 1: this level is the lower level (phi, theta), the levels
        above it are upper levels (the codebook C). Betty's own ``Problem.step`` runs the same operations in the
        same order, spread over ``step_normal``, which recurses into the upper levels, and
        ``step_after_roll_back``; here they read in the paper's order, with Betty's bookkeeping kept in
        ``_begin_step``, ``_end_step`` and ``_uppers_to_step``. Other configurations run the same sequence with
        parts absent: VQ-VAE (one level) is step 1 alone, its one step; with xi = 0 (alternated optimization, Huh
        §4.2) Betty's graph is reversed (``engines.build.level_graph``), so that step 1 is the codebook's step
        on its direct gradient (``hypergradient.inner_steps`` of them, one per sub-batch: ``inner_step_descent``)
        and the encoder-decoder steps in step 4's place, without an implicit term. With
        ``hypergradient.unroll_steps`` k, steps 2-5 follow every k-th step 1, and look through all k of them
        (``hypergradient_context``, ``step_after_roll_back``).
        """
        self._global_step = global_step
        if self.mutual:
            return self.mutual_step()
        if not self.check_ready():  # (a lowest level always is)
            return
        # 1. Tentative lower step on batch b: (phi', theta') = step(phi, theta; grad_{phi,theta} L(phi, theta, C)),
        #    Eq. 10 with this level's own optimizer. Before it the level keeps (phi, theta), which Eq. 13 perturbs,
        #    and xi, the lr the step uses (remember_pre_step); with roll-back also its whole state (cache_states).
        self._begin_step()
        self.one_step_descent()
        self._end_step()
        for upper in self._uppers_to_step():
            # 2. v and the direct term, at (phi', theta') on the same batch b (data: shared): the upper loss
            #    L(phi', theta', C); its gradient grad_C L(phi', theta', C), the direct term, goes into C's .grad,
            #    and v = grad_{phi',theta'} L(phi', theta', C) is taken per lower level in add_implicit_terms.
            loss = upper.post_step_loss()
            upper.add_direct_term(loss)
            # 3. The implicit term, Eq. 13: v handed to the hypergradient that hypergradient.type names (by default
            #    mqvae.method.hypergradients.mqvae: -xi [grad_C L(phi+, theta+, C) - grad_C L(phi-, theta-, C)] / (2 eps)
            #    around the pre-step parameters, eps = alpha / ||v||), added to C's .grad.
            upper.add_implicit_terms(loss)
            # 4. The codebook step, on direct + implicit.
            upper.take_optimizer_step()
        # 5. Roll-back (hypergradient.roll_back; off by default, docs/design.md): restore (phi, theta) and the lower
        #    optimizer's state (recover_states), and take the real lower step with the updated C on the same
        #    batch b (Betty's step_after_roll_back, which does the same for the levels above that roll back).
        if self._unrolled():
            self.step_after_roll_back()

    def mutual_step(self) -> None:
        """One iteration of MQ-VAE‡ (App. E, ``hypergradient.mutual``), from the lower level (phi, theta) with the
        upper level (C) above it: each side predicts the other's next state from the same current state (phi,
        theta, C) and takes its step against that prediction (policy prediction, Zhang & Lesser 2010).

        Betty's graph keeps its one edge C -> (phi, theta); the reverse look-ahead needs no edge of its own, because
        nothing in one iteration depends on its own result: each side's hypergradient is taken while the other
        side's tentative step stands, then that step is undone, and only then do both real steps run.
        """
        upper = self._parents[0]
        # Betty's bookkeeping of both levels' steps; the lower level's also keeps (phi, theta) and xi_lower, the lr
        # its tentative step uses (remember_pre_step).
        self._begin_step()
        upper._begin_step()
        # 1. The lower level's tentative step from (phi, theta, C) on its batch b: (phi', theta'), Eq. 10 with its
        #    own optimizer.
        with phase(f"{self.name}.undo_tentative_step"):
            self._tentative_state.save(self)
        self.one_step_descent()
        # 2. The upper level's gradient, MQ-VAE's: direct term at (phi', theta', C) plus Eq. 13's implicit term
        #    around (phi, theta) (Level.step's steps 2-3). Kept aside while the upper level predicts in its turn.
        loss = upper.post_step_loss()
        upper.add_direct_term(loss)
        upper.add_implicit_terms(loss)
        upper_grads = upper.take_grads()
        # 3. Undo the tentative step: (phi, theta) and the lower optimizer's state as they were.
        with phase(f"{self.name}.undo_tentative_step"):
            self._tentative_state.restore(self)
        # 4. The upper level's tentative step from the same (phi, theta, C), on its own batch: C', with its own
        #    optimizer; xi_upper is the lr it uses.
        upper.remember_pre_step()
        with phase(f"{upper.name}.undo_tentative_step"):
            upper._tentative_state.save(upper)
        params = upper.trainable_parameters()
        with phase(f"{upper.name}.tentative_step"):
            # (its loss restricted to what grad_C needs: no decoder pass under plain straight-through)
            loss = upper.hypergradient_loss(upper.cur_batch, upper)
            upper.set_grads(params, grads_or_zeros(loss, params))
            upper.take_optimizer_step()
        # 5. The lower level's gradient, MQ-VAE†'s: direct term grad_{phi,theta} L(phi, theta, C') on its batch b,
        #    plus the implicit term through the upper level's step: v = grad_{C'} L(phi, theta, C') handed to the
        #    hypergradient (Eq. 13's form with the roles swapped: C perturbed by +- eps v around its pre-step value,
        #    the difference of grad_{phi,theta} of the upper level's loss, times -xi_upper).
        own = self.trainable_parameters()
        with phase(f"{self.name}.backward"):  # (as an upper level's backward, it includes the hypergradient)
            grads = grads_or_zeros(self.training_step(self.cur_batch), own + params)
            direct, vector = grads[:len(own)], grads[len(own):]
            implicit = jvp_fn_mapping[self._config.type](vector, upper, self, False)
        # 6. Undo the upper level's tentative step.
        with phase(f"{upper.name}.undo_tentative_step"):
            upper._tentative_state.restore(upper)
        # 7. Both real steps, from (phi, theta, C).
        upper.set_grads(params, upper_grads)
        upper.take_optimizer_step()
        self.set_grads(own, direct)
        self.set_grads(own, implicit)
        self._direct, self._terms = direct, (direct, implicit)
        self.take_optimizer_step()
        for level in (self, upper):
            level._end_step()  # (each schedule advances once: roll-back is refused with mutual)

    def step_after_roll_back(self):
        """Algorithm 1's step 5 after k unrolled steps (``hypergradient.unroll_steps``): the state the window
        started from, then the k real steps with the updated codebook, each on its tentative step's batch and each
        followed by the lr schedule's step. (Betty's ``step_after_roll_back`` would take one real step, on the last
        batch: the lower level would advance one step per k batches.) One step is Betty's own."""
        if self._unroll_steps == 1:
            return super().step_after_roll_back()
        if self.check_ready() and self._training and self._roll_back:
            batches = [record.batch for record in self._unroll[:self._unroll_steps]]
            self.recover_states()
            for batch in batches:
                self.one_step_descent(batch=batch)
                if self.scheduler is not None:
                    self.scheduler.step()
            # (A level with k > 1 is a lowest level, below levels that do not roll back: mqvae.config's check.)
        self.ready = [False for _ in range(len(self._children))]

    def take_grads(self) -> list[torch.Tensor]:
        """The level's parameters' gradients, their ``.grad`` left empty."""
        params = self.trainable_parameters()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        for p in params:
            p.grad = None
        return grads

    def _begin_step(self) -> None:
        """Betty's bookkeeping before a level's step (``Problem.step_normal``): at the start of an inner loop with
        roll-back, the state to roll back to; the step counter; below another level, what Eq. 13 needs."""
        if self._inner_loop_start:
            if self.is_implemented("on_inner_loop_start"):
                self.on_inner_loop_start()
            self._inner_loop_start = False
            if self._roll_back:
                self.cache_states()
        if self._training:
            self._count += 1
        if self._parents and self._training:
            self.remember_pre_step()

    def _end_step(self) -> None:
        """Betty's bookkeeping after a level's step. With roll-back the real step steps the lr schedule instead.
        (Betty's per-problem logging is off: engines.build sets its log_step to -1, the engine logs.)"""
        if self.scheduler is not None and not self._roll_back:
            self.scheduler.step()
        if self._parents and self._training and self._unroll:
            self._unroll[self._unroll_index()].batch = self.cur_batch  # b_j, the batch of the step just taken
        if self._unrolled():
            self._inner_loop_start = True
        self.ready = [False for _ in range(len(self._children))]

    def _unrolled(self) -> bool:
        """Whether this step completes the level's inner loop: Betty's unroll_steps x gradient_accumulation steps
        after its warm-up (one step, as engines.build configures Betty)."""
        return self._training and self._count % (self._unroll_steps * self.gas) == 0 and self._count > self.warmup_steps

    def _uppers_to_step(self):
        """The upper levels that step after this level's step, in Betty's order: each once every level below it
        has stepped (Betty's ``ready`` flags), and right after it the levels above it in turn (depth first, as
        Betty's ``step_normal`` recursion goes), each between its ``_begin_step`` and ``_end_step``."""
        if not self._unrolled():
            return
        pending = [(upper, self) for upper in reversed(self._parents)]
        while pending:
            upper, lower = pending.pop()
            upper.ready[upper.children.index(lower)] = True
            if not upper.check_ready():
                continue  # it waits for another level below it
            upper._begin_step()
            yield upper
            upper._end_step()
            if upper._unrolled():
                pending.extend((above, upper) for above in reversed(upper._parents))

    def post_step_loss(self) -> torch.Tensor:
        """An upper level's loss on its batch, at the lower levels' post-step parameters."""
        self.cur_batch = self.get_batch()
        loss, _ = self.get_loss(self.cur_batch)
        return loss

    @in_phase("backward")
    def add_direct_term(self, loss) -> None:
        """The gradient of the level's loss with respect to its own parameters, into their ``.grad`` (the first
        half of Betty's ``Problem.backward``): for an upper level, the direct term."""
        params = self.trainable_parameters()
        if self._paths or not self.gradient_accumulation_boundary():
            grads = torch.autograd.grad(loss, params, create_graph=not self._first_order,
                                        retain_graph=self._retain_graph, allow_unused=self._allow_unused)
            self.set_grads(params, grads)
            self._direct = grads
        else:
            torch.autograd.backward(loss, inputs=params, create_graph=not self._first_order,
                                    retain_graph=self._retain_graph)

    @in_phase("backward")  # includes the hypergradient, which has its own phase
    def add_implicit_terms(self, loss) -> None:
        """The second half of Betty's ``Problem.backward``: for each path down to a lower level, v, the gradient of
        ``loss`` with respect to that level's parameters, handed to the hypergradient of that level's
        ``Config.type`` (``betty.hypergradient.get_grads``), whose result is added to the parameters' ``.grad``."""
        if not self._config.first_order:
            return
        params = self.trainable_parameters()
        implicit = None
        for index, path in enumerate(self._paths):
            # Not Betty's sync mode (the method adding to .grad itself, for DDP's hooks, which the toolkit does
            # not use: Level.optimizer_step averages): the terms come back, so that they can be logged (Fig. 6).
            grads = get_grads(loss, path, index < len(self._paths) - 1, False)
            self.set_grads(params, grads)
            # (A copy of the first: set_grads hands .grad a term itself where .grad was None, and clipping and
            # data-parallel averaging write .grad in place.)
            implicit = [g.clone() for g in grads] if implicit is None else torch._foreach_add(implicit, grads)
        if implicit is not None:
            self._terms = (self._direct, implicit)

    def hypergradient_stats(self) -> dict[str, torch.Tensor]:
        """MQ-VAE Fig. 6 for an upper level's latest step: the norms of the direct term (grad_C L(phi', theta', C))
        and of the implicit term (the sum over the paths below it), their cosine similarity (0 where either is
        zero) and implicit_ratio = ||implicit|| / ||direct||. Tensors on the device; reading them is the caller's
        host sync, at logging steps only. Empty for a level that took no hypergradient (no level below it, or
        xi = 0). Data-parallel: a collective, so every rank calls it."""
        if self._terms is None:
            return {}
        direct, implicit = (torch.cat([(torch.zeros_like(p) if g is None else g).detach().reshape(-1).double()
                                       for g, p in zip(terms, self.trainable_parameters())]) for terms in self._terms)
        # Data-parallel: each rank holds its share; Level.optimizer_step steps on their mean, so measure that.
        distributed.average_([direct, implicit])
        direct_norm, implicit_norm = torch.linalg.vector_norm(direct), torch.linalg.vector_norm(implicit)
        tiny = torch.finfo(torch.float64).tiny
        return {"direct_norm": direct_norm, "implicit_norm": implicit_norm,
                "cosine": (direct @ implicit) / (direct_norm * implicit_norm).clamp_min(tiny),
                "implicit_ratio": implicit_norm / direct_norm.clamp_min(tiny)}

    def take_optimizer_step(self) -> None:
        """The end of Betty's ``one_step_descent``: its callbacks and, once gradients are accumulated, the
        optimizer step. (Betty's parameter synchronisation is for distributed strategies; the engine runs one.)"""
        if self.is_implemented("grad_callback"):
            self.grad_callback()
        if self._count % self.gas == 0:
            self.optimizer_step()
            if self.is_implemented("param_callback"):
                self.param_callback()
            self.zero_grad()

    def _note_gradient(self) -> None:
        """Count optimizer steps whose gradient has norm 0 in every parameter (a parameter without one counts as
        zero), without a host synchronisation. The float32 2-norm (torch's fastest foreach reduction: 43 us for the
        digits model's 31 tensors on the 2-core CPU, where the inf-norm takes 500 us) is 0 only when every entry is
        below about 1e-22 in magnitude, a gradient that moves no parameter."""
        params = self.trainable_parameters()
        if not params:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if self._zero_run is None:
            self._zero_run = torch.zeros((), dtype=torch.long, device=params[0].device)
            self._longest_zero_run = torch.zeros_like(self._zero_run)
        # In place, as every state the step carries to the next: a CUDA graph replays the same memory
        # (engines.graphs).
        self._zero_run.add_(1)
        if grads:
            self._zero_run.mul_(torch.stack(torch._foreach_norm(grads)).sum() == 0)  # (the run, or 0)
        torch.maximum(self._longest_zero_run, self._zero_run, out=self._longest_zero_run)

    def zero_gradient_steps(self) -> int:
        """The longest run so far of optimizer steps with a zero gradient (a host sync)."""
        return 0 if self._longest_zero_run is None else int(self._longest_zero_run)

    # -- Betty hooks ------------------------------------------------------------------------------
    @in_phase("forward")
    def get_loss(self, batch, terms=None):
        # Betty's version calls loss.item() every step, a host sync in the hot loop; keep tensors and
        # let the engine read them at logging steps only. ``terms`` replaces step_terms (FastRollBack).
        stats = (terms or self.step_terms)(batch)
        if self.learned is None and torch.is_grad_enabled():
            params = self.trainable_parameters()
            self.learned = {key for key in self.learned_scalars if key in stats and _reaches(stats[key], params)}
        out = stats.pop("_out", None)
        if out is not None and self.keeps_forward():
            self.last_forward = (out.z_e.detach(), out.quant.detached())
        # (Detached where autograd records them, so that the logged values hold no graph; a batch perplexity has none.)
        self.last_stats = {k: v.detach() if v.requires_grad else v for k, v in stats.items()}
        self.new_losses.append(self.last_stats["loss"])
        # (Without gradient accumulation, no division: x / 1 is x, and an operation saved per step.)
        return stats["loss"] / self.gas if self.gas > 1 else stats["loss"], self.last_stats

    def get_batch(self):
        if self.data == "shared":
            return self._children[0].cur_batch
        if self.staged is not None:
            return self.staged.next()
        return super().get_batch()

    def draw_batch(self):
        """The next batch of the level's own stream (Betty's draw)."""
        return super().get_batch()

    def one_step_descent(self, batch=None):
        # A step of this level on its loss: the tentative step (batch None: the next batch) or, after a
        # roll-back, the real step on the same batch. FastRollBack, where attached, may take both.
        fast = self.fast_roll_back
        if fast is not None and self._training and fast.takes(self, batch):
            return fast.one_step_descent(self, batch)
        if self.inner_steps > 1:
            return self.inner_step_descent(batch)
        return super().one_step_descent(batch)

    def inner_step_descent(self, batch=None):
        """Huh Table 10's inner loop (``hypergradient.inner_steps`` = k): k optimizer steps on the k sub-batches of
        the iteration's batch, in order (``sub_batches``), each at the parameters the previous one left; the
        iteration's batch stays ``cur_batch``, which the level above steps on whole (its data is shared).

        Each step goes through ``take_optimizer_step``, so the data-parallel gradient averaging and the zero-gradient
        count see every one. The lr schedule is per iteration: ``_end_step`` steps the scheduler once, after the k
        steps, which all take the iteration's lr. Quantizer maintenance is unchanged, once per iteration on the
        forward of the level that trains the encoder (``LevelEngine.maintain``), so no statistic counts a sub-batch.
        The logged terms (``last_stats``: ``<level>.loss``, ``<level>.perplexity``, ...) are the means over the k
        steps, each taken on its sub-batch before its step: with k = 1 that is the one step's."""
        if batch is None:
            self.cur_batch = batch = self.get_batch()
        params = self.trainable_parameters()
        steps = []
        for part in sub_batches(batch, self.inner_steps):
            loss, terms = self.get_loss(part)
            self.backward(loss, params, self._paths, create_graph=not self._first_order,
                          retain_graph=self._retain_graph, allow_unused=self._allow_unused)
            self.take_optimizer_step()
            steps.append(terms)
        self.last_stats = {key: torch.stack([terms[key] for terms in steps]).mean(0) for key in steps[0]}
        return self.last_stats

    @in_phase("backward")
    def backward(self, loss, params, paths, create_graph=False, retain_graph=True, allow_unused=True):
        return super().backward(loss, params, paths, create_graph, retain_graph, allow_unused)

    @in_phase("optimizer_step")
    def optimizer_step(self, *args, **kwargs):
        # Every step of the level comes here (Betty's one_step_descent, take_optimizer_step). Data-parallel: the
        # mean of the ranks' gradients (direct and implicit terms alike), as one process with the global batch
        # has (mqvae.runtime.distributed); then the zero-gradient count.
        distributed.average_grads(self.trainable_parameters())
        self._note_gradient()
        return super().optimizer_step(*args, **kwargs)

    @in_phase("roll_back")
    def cache_states(self):
        if self.fast_roll_back is not None:
            return self.fast_roll_back.cache_states(self)
        return super().cache_states()

    @in_phase("roll_back")
    def recover_states(self, clean=True):
        if self.fast_roll_back is not None:
            return self.fast_roll_back.recover_states(self)
        return super().recover_states(clean)


def _reaches(value: torch.Tensor, params: list[torch.Tensor]) -> bool:
    """Whether a gradient flows from ``value`` to any of ``params`` (it is computed from them), without touching
    their ``.grad``: a learned scalar, rather than one that follows a schedule."""
    if not (params and value.requires_grad):
        return False
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return any(grad is not None for grad in grads)


class StagedBatches:
    """A level's batches in static slots, for ``perf.cuda_graphs`` (engines.graphs): a captured iteration reads its
    batches from the same memory at every replay, so they are drawn from the level's stream outside the graph and
    copied into the slots before the iteration (``begin`` staged); each ``Level.get_batch`` of the iteration hands
    out the next slot. In an iteration that is not staged (eager, before the capture) get_batch draws and copies at
    once, and the draws of each phase of the iteration's period are counted, which later iterations of that phase
    then draw ahead. Each stream is drawn in the same order either way, so the batches are the eager run's."""

    def __init__(self, level: "Level"):
        self.level = level
        self.slots: list[tuple] = []
        self.counts: dict[int, int] = {}  # phase -> batches an iteration of that phase takes
        self.phase, self.taken, self.staged = None, 0, False

    def begin(self, phase: int, staged: bool) -> None:
        """Before an iteration of ``phase``: with ``staged``, draw its batches into the slots now."""
        if staged:
            for j in range(self.counts.get(phase, 0)):
                self._fill(j, self.level.draw_batch())
        else:
            self.counts[phase] = 0  # (counted afresh: the latest eager iteration of the phase is the one that counts)
        self.phase, self.taken, self.staged = phase, 0, staged

    def next(self) -> tuple:
        j = self.taken
        self.taken += 1
        if not self.staged:
            self.counts[self.phase] = self.taken
            return self._fill(j, self.level.draw_batch())
        if j >= self.counts.get(self.phase, 0):
            raise RuntimeError(f"level '{self.level.name}': an iteration of phase {self.phase} took more batches than "
                               "the eager one before it: the iteration's control flow is not periodic")
        return self.slots[j]

    def _fill(self, j: int, batch) -> tuple:
        if j == len(self.slots):
            self.slots.append(tuple(t.clone() for t in batch))
        else:
            for slot, t in zip(self.slots[j], batch):
                slot.copy_(t, non_blocking=True)
        return self.slots[j]


def sub_batches(batch, k: int) -> list[tuple]:
    """The k equal sub-batches of Huh Table 10's inner steps: the i-th takes items i, i + k, i + 2k, ... of every
    tensor of ``batch``. Strided rather than consecutive, because a data-parallel rank holds a consecutive slice of
    the global batch (``mqvae.data.loader.BatchStream``): the ranks' i-th sub-batches are then together the i-th
    sub-batch of the global batch, and N ranks stay one process with N times the batch. The config makes k divide
    the per-rank batch."""
    return [tuple(t[i::k] for t in batch) for i in range(k)]


class FastRollBack:
    """Opt-in speed-ups of Algorithm 1's roll-back (step 5), for one level that rolls back.

    ``engines.build`` attaches one to every level that rolls back. Without it a level rolls back as Betty does:
    ``ImplicitProblem.cache_states`` deep-copies the module's and the optimizer's ``state_dict`` every iteration,
    ``recover_states`` loads them back, and the real step runs its own forward. With it:

    - state cache: the same states are saved into buffers allocated once and refilled by one fused copy, and
      restored in place, exactly as ``load_state_dict`` would;
    - kept encoder forward: the real step runs on the tentative step's batch at the tentative step's starting
      parameters, only the codebook having moved, so the encoder's forward is the same. The tentative step
      keeps its graph and the real step runs only the quantizer, the decoder and the backward (``takes`` says
      where this is exact).

    Measured saving, as a share of the ``mqvae_roll_back`` step without it (median s/iteration of engines built
    alike, with and without it, run interleaved as in ``bench.step_times``; OMP_NUM_THREADS=1 on a 2-core CPU
    shared with other jobs; digits: batch 64, 10 + 60 iterations, 3 runs; paper shape: batch 32, 2 + 12, 2 runs):
    - state cache: 4.4-7.8 % on digits, 0.4-1.8 % at the paper shape. Timed alone, cache + restore take 0.29
      instead of 1.99 ms on digits (4.5 % of the step) and 6.2 instead of 7.0 ms at the paper shape (0.1 %):
      it saves Betty's per-tensor overhead, which only small models notice;
    - kept encoder forward: 2.1-4.6 % on digits, 3.9-4.0 % at the paper shape;
    - both: 7.3-10.8 % on digits, 4.1-4.6 % at the paper shape.
    Their results are bit-identical to the level without them (tests/test_bilevel.py).
    """

    def __init__(self):
        self.states = StateCache()
        self._reuses_encoder_forward: bool | None = None
        self._kept: EncoderForward | None = None

    # -- state cache --------------------------------------------------------------------------------------
    def cache_states(self, level) -> None:
        self.states.save(level)

    def recover_states(self, level) -> None:
        self.states.restore(level)

    # -- kept encoder forward --------------------------------------------------------------------------
    def takes(self, level, batch) -> bool:
        """Whether this step runs with the kept encoder forward: the tentative step (``batch`` None) records it
        and the real step (``batch`` b) replays it, where that is exact."""
        if self._reuses_encoder_forward is None:  # fixed once the engine has set the level up
            self._reuses_encoder_forward = self._exact_for(level)
        return self._reuses_encoder_forward and (batch is None or self._kept is not None)

    @staticmethod
    def _exact_for(level) -> bool:
        """Only the plain case: the level trains the encoder, takes one step per iteration (Betty's unroll_steps
        and gradient_accumulation are 1), its loss is Eq. 6 (the model's loss, which takes a kept z_e; a level
        with its own loss_terms computes that), and no level below it (whose paths would differentiate it)."""
        encoder = getattr(level.model, "encoder", None)
        return (encoder is not None and level._trains(encoder) and level._unroll_steps == 1 and level.gas == 1
                and not level._paths and type(level).loss_terms is Level.loss_terms)

    def one_step_descent(self, level, batch=None):
        """Betty's ``one_step_descent`` with the kept encoder forward: the tentative step (``batch`` None) records
        it, the real step after the roll-back (``batch`` b) replays it."""
        tentative = batch is None
        if tentative:
            level.cur_batch = batch = level.get_batch()
        else:
            self._kept.restore_buffers(level.model.encoder)  # recover_states rewound them
        try:
            loss, stats = level.get_loss(batch, terms=functools.partial(self._loss, level, record=tentative))
            # The kept forward ran on stand-ins of the encoder's parameters: differentiate with respect to them
            # and hand their gradients to the parameters. The tentative step keeps the graph for the real step.
            params = level.trainable_parameters()
            inputs = [self._kept.stand_ins.get(p, p) for p in params]
            level.backward(loss, inputs, level._paths, create_graph=not level._first_order,
                           retain_graph=level._retain_graph or tentative, allow_unused=level._allow_unused)
            for p, s in zip(params, inputs):
                if s is not p and s.grad is not None:
                    p.grad = s.grad if p.grad is None else p.grad + s.grad
                    s.grad = None
            level.take_optimizer_step()
        finally:
            if not tentative:
                self._kept = None
        return stats

    def _loss(self, level, batch, record: bool) -> dict:
        if record:
            self._kept = EncoderForward.record(level.model.encoder, batch[0])
        return level.model.loss(batch, weights=level.loss_weights(), z_e=self._kept.z_e)


class StateCache:
    """A level's parameters, buffers and optimizer state, saved into buffers allocated once and refilled by one fused
    copy, and restored in place, exactly as ``load_state_dict`` would: the roll-back of Algorithm 1
    (``FastRollBack``) and the undoing of both tentative steps of mutual look-ahead (``Level.mutual_step``)."""

    def __init__(self):
        self._states: list[torch.Tensor] | None = None
        self._state_cache: list[torch.Tensor] | None = None
        self._opt_cache: dict | None = None

    def save(self, level) -> None:
        if self._states is None:  # fixed once built, like trainable_parameters
            self._states = [*level.module.parameters(), *level.module.buffers()]
        tensors = self._states
        if self._state_cache is None or len(self._state_cache) != len(tensors):
            self._state_cache = [torch.empty_like(t) for t in tensors]
        saved, live = list(self._state_cache), list(tensors)
        old = self._opt_cache or {"state": {}}
        cache = {"groups": [], "state": {}}
        optimizer = level.optimizer
        if optimizer is not None:
            cache["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            for group in optimizer.param_groups:
                for p in group["params"]:
                    state = optimizer.state.get(p)
                    if not state:
                        continue  # no state yet (first step): recover_states removes what the step creates
                    previous = old["state"].get(p, {})
                    entry = {}
                    for name, value in state.items():
                        if torch.is_tensor(value):
                            buf = previous.get(name)
                            if not (torch.is_tensor(buf) and buf.shape == value.shape and buf.dtype == value.dtype
                                    and buf.device == value.device):
                                buf = torch.empty_like(value)
                            saved.append(buf)
                            live.append(value)
                        entry[name] = buf if torch.is_tensor(value) else value
                    cache["state"][p] = entry
        with torch.no_grad():
            torch._foreach_copy_(saved, live)
        self._opt_cache = cache

    def state_dict(self, level) -> dict:
        """The saved state, for a checkpoint taken while it is held (inside a window of unrolled steps): the
        optimizer's entries by the position of their parameter in its groups."""
        positions = {p: i for i, p in enumerate(p for g in level.optimizer.param_groups for p in g["params"])}
        return {"tensors": [t.detach().clone() for t in self._state_cache], "groups": self._opt_cache["groups"],
                "optimizer": {positions[p]: entry for p, entry in self._opt_cache["state"].items()}}

    def load_state_dict(self, level, state: dict) -> None:
        """``state_dict``'s inverse, on the level's device."""
        self._states = [*level.module.parameters(), *level.module.buffers()]
        if len(state["tensors"]) != len(self._states):
            raise ValueError(f"roll-back state of level '{level.name}': {len(state['tensors'])} tensors for "
                             f"{len(self._states)} parameters and buffers")
        self._state_cache = [t.to(live.device) for t, live in zip(state["tensors"], self._states)]
        params = [p for g in level.optimizer.param_groups for p in g["params"]]

        def placed(p, name, value):
            # Where the live state keeps it (torch keeps Adam's step on the CPU), else with the parameter.
            live = level.optimizer.state.get(p, {}).get(name)
            return value.to(live.device if torch.is_tensor(live) else p.device)

        self._opt_cache = {"groups": state["groups"], "state": {
            params[i]: {name: placed(params[i], name, value) if torch.is_tensor(value) else value
                        for name, value in entry.items()}
            for i, entry in state["optimizer"].items()}}

    def restore(self, level) -> None:
        live, saved = list(self._states), list(self._state_cache)
        optimizer = level.optimizer
        if optimizer is not None:
            for group, groups_saved in zip(optimizer.param_groups, self._opt_cache["groups"]):
                group.update(groups_saved)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    entry = self._opt_cache["state"].get(p)
                    if entry is None:
                        optimizer.state.pop(p, None)
                        continue
                    state = optimizer.state[p]
                    for name in [n for n in state if n not in entry]:
                        del state[name]
                    for name, value in entry.items():
                        current = state.get(name)
                        if not torch.is_tensor(value):
                            state[name] = value
                        elif torch.is_tensor(current) and current.shape == value.shape and current.dtype == value.dtype:
                            live.append(current)
                            saved.append(value)
                        else:
                            state[name] = value.clone()
        with torch.no_grad():
            torch._foreach_copy_(live, saved)


class EncoderForward:
    """An encoder forward whose graph stays valid while the encoder's parameters are written in place.

    The forward runs on ``.data`` aliases of the parameters: they share the parameters' storage but not their
    autograd version counters. Between the tentative step and the real step after a roll-back, the optimizer
    step, the finite-difference passes and ``recover_states`` write the parameters in place; the last of these
    puts back exactly the values the forward saw, so backpropagating through the kept graph then is exact
    (the Algorithm 1 roll-back test checks it against recomputation). BatchNorm running statistics are
    snapshotted after the forward, because the roll-back rewinds them and the real step does not rerun it.
    """

    def __init__(self, z_e, stand_ins, buffers):
        self.z_e, self.stand_ins, self.buffers = z_e, stand_ins, buffers

    @classmethod
    def record(cls, encoder: torch.nn.Module, x: torch.Tensor) -> "EncoderForward":
        named = dict(encoder.named_parameters())
        aliases = {name: p.data.requires_grad_(p.requires_grad) for name, p in named.items()}
        # Buffers too: BatchNorm's backward keeps its running statistics, which later forwards update in place.
        buffer_aliases = {name: b.data for name, b in encoder.named_buffers()}
        z_e = torch.func.functional_call(encoder, {**aliases, **buffer_aliases}, (x,))
        buffers = [b.detach().clone() for b in encoder.buffers()]
        return cls(z_e, {p: aliases[name] for name, p in named.items()}, buffers)

    def restore_buffers(self, encoder: torch.nn.Module) -> None:
        with torch.no_grad():
            for b, saved in zip(encoder.buffers(), self.buffers):
                b.copy_(saved)
