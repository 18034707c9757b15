"""The base of every level: a Betty ``ImplicitProblem`` that trains one part of a shared ``VQModel``.

All levels evaluate the same loss (MQ-VAE Eq. 6, ``VQModel.loss``); a level
differs from another only in the parameters it trains, the batches it sees and
its optimizer. Subclasses say which part of the model they train
(``module_of``) and may override the loss (``loss_terms``).
"""

from __future__ import annotations

import functools
import inspect

import torch
from betty.problems import ImplicitProblem

from mqvae.perf import phase


def in_phase(label: str):
    """Run the decorated Level method inside the profiler region ``<level name>.<label>`` (``mqvae.perf.phase``)."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            with phase(f"{self.name}.{label}"):
                return method(self, *args, **kwargs)

        return wrapper

    return decorate


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


class Level(ImplicitProblem):
    def __init__(self, name, config, module, optimizer, scheduler, train_data_loader, *, model, level_cfg, xi=0.0, fd_alpha=0.01):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader)
        self.model = model
        self.level_cfg = level_cfg
        # Eq. 10's xi and Eq. 13's finite-difference radius, read by the hypergradient of this level's
        # best response (mqvae.hypergradients) when this level sits below another. xi=None (the config's
        # ``xi: null``) is the learning rate the tentative step really uses, re-read every iteration so that
        # it follows warm-up and cosine schedules (remember_pre_step).
        self.xi_follows_lr = xi is None
        self.xi = level_cfg.lr if xi is None else xi
        self.fd_alpha = fd_alpha
        self.batch_source = None  # a lower level whose batch this level reuses (data: shared)
        self.last_stats: dict = {}
        self.last_forward = None  # (z_e, quantizer output) of the latest real step, for quantizer maintenance
        self.stream = train_data_loader
        self._trainable: list[torch.Tensor] | None = None
        self._trains_cache: dict[int, bool] = {}
        self._state_list: list[torch.Tensor] | None = None
        self._pre_step: list[torch.Tensor] | None = None
        # Roll-back cache (Algorithm 1, line 5): preallocated once, filled by copy_ every iteration.
        self._state_cache: list[torch.Tensor] | None = None
        self._opt_cache: dict | None = None
        # The tentative step's encoder forward, kept for the real step after a roll-back (EncoderForward).
        self._encoder_pass: str | None = None  # "record" (tentative step) or "replay" (real step)
        self._kept_forward: EncoderForward | None = None

    # -- what the level trains --------------------------------------------------------------
    @classmethod
    def module_of(cls, model) -> torch.nn.Module:
        """The part of ``model`` whose parameters this level trains."""
        raise NotImplementedError

    def param_groups(self):
        """Optimizer parameter groups. A quantizer trained by this level may ask for its own groups with an
        ``lr_scale`` (e.g. ``affine_lr`` for the affine parameters, Huh et al. A.1)."""
        params = self.trainable_parameters()
        quantizer = getattr(self.model, "quantizer", None)
        if quantizer is None or not hasattr(quantizer, "param_groups") or not self._trains(quantizer):
            return [{"params": params}]
        groups = [{"params": list(g["params"]), "lr": self.level_cfg.lr * g.get("lr_scale", 1.0)} for g in quantizer.param_groups()]
        owned = {id(p) for g in groups for p in g["params"]}
        rest = [p for p in params if id(p) not in owned]
        return ([{"params": rest}] if rest else []) + [g for g in groups if g["params"]]

    def patch_scheduler(self):
        # Betty rebuilds LambdaLR with one lr_lambda per group of the optimizer it was first given; a level's
        # rebuilt optimizer may have more groups (quantizer lr scales), which all follow the level's schedule.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.scheduler.lr_lambdas[0])

    def patch_optimizer(self):
        # Betty rebuilds the optimizer as ``cls(params, **optimizer.defaults)``; on current torch AdamW's defaults
        # hold keys its constructor does not take (``decoupled_weight_decay``), so keep only accepted ones.
        cls = type(self.optimizer)
        accepted = inspect.signature(cls.__init__).parameters
        self.optimizer = cls(self.param_groups(), **{k: v for k, v in self.optimizer.defaults.items() if k in accepted})

    def trainable_parameters(self):
        # Betty and the hypergradients ask for this list many times per iteration, and walking the module tree
        # each time cost ~5 % of an MQ-VAE step on the CPU. A level's parameter set is fixed once it is built
        # (freeze parameters before building the engine); the list is a copy, so callers cannot alter it.
        if self._trainable is None:
            self._trainable = [p for p in self.module.parameters() if p.requires_grad]
        return list(self._trainable)

    def _trains(self, part: torch.nn.Module | None) -> bool:
        """Whether this level's module contains ``part`` (fixed once built, so computed once)."""
        if part is None:
            return False
        if id(part) not in self._trains_cache:
            self._trains_cache[id(part)] = any(m is part for m in self.module.modules())
        return self._trains_cache[id(part)]

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

    def training_step(self, batch):
        # Betty's own hypergradient methods call this at perturbed parameters; it must stay pure.
        return self.loss_terms(batch)["loss"]

    def hypergradient_loss(self, batch, upper) -> torch.Tensor:
        """This level's loss, restricted to what the gradient with respect to ``upper``'s parameters needs.

        With a plain straight-through estimator the task loss cannot reach the codebook, so the
        codebook's gradient needs only ``VQModel.quantization_terms``: the decoder forward of the
        finite-difference passes would be wasted (README, Performance: the passes an iteration needs).
        """
        if upper.module is getattr(self.model, "quantizer", None) and self._codebook_needs_encoder_only():
            return self.model.quantization_terms(batch)["loss"]
        return self.training_step(batch)

    def _codebook_needs_encoder_only(self) -> bool:
        quantizer = getattr(self.model, "quantizer", None)
        return (quantizer is not None and hasattr(self.model, "encoder") and not quantizer.task_reaches_codebook
                and not self.loss_weights())

    # -- Betty hooks ------------------------------------------------------------------------------
    @in_phase("forward")
    def get_loss(self, batch):
        # Betty's version calls loss.item() every step, a host sync in the hot loop; keep tensors and
        # let the engine read them at logging steps only.
        if self._steps_on_quantization_loss():
            stats = self.model.quantization_terms(batch)
        elif self._encoder_pass is not None:
            if self._encoder_pass == "record":
                self._kept_forward = EncoderForward.record(self.model.encoder, batch[0])
            stats = self.model.loss(batch, weights=self.loss_weights(), z_e=self._kept_forward.z_e)
        else:
            stats = self.loss_terms(batch)
        out = stats.pop("_out", None)
        if out is not None:
            self.last_forward = (out.z_e.detach(), out.quant.detached())
        self.last_stats = {k: v.detach() for k, v in stats.items()}
        return stats["loss"] / self.gas, self.last_stats

    def _steps_on_quantization_loss(self) -> bool:
        """Alternated optimization (xi = 0, Huh §4.2): the codebook level steps first, on its direct gradient,
        and no level differentiates through it. With a plain straight-through estimator that gradient is the
        gradient of the quantizer's part of Eq. 6 alone, so the level runs the encoder and the quantizer and
        skips the decoder (README, Performance: ~1.1x instead of ~1.33x). Its logged ``loss`` is then that
        part of Eq. 6 (commitment and codebook terms), not the task loss."""
        return (self.module is getattr(self.model, "quantizer", None) and not self._children
                and self._training and type(self).loss_terms is Level.loss_terms and self._codebook_needs_encoder_only())

    def get_batch(self):
        if self.batch_source is not None:
            return self.batch_source.cur_batch
        return super().get_batch()

    def one_step_descent(self, batch=None):
        # Eq. 13 perturbs the pre-step parameters, so remember them before the tentative step.
        # (batch is given only for the real step after a roll-back, whose pre-step state is not needed.)
        if batch is None and self._parents and self._training:
            self.remember_pre_step()
        if not self._reuses_encoder_forward() or (batch is not None and self._kept_forward is None):
            return super().one_step_descent(batch)
        if batch is None:
            self._encoder_pass = "record"
        else:
            self._encoder_pass = "replay"
            self._kept_forward.restore_buffers(self.model.encoder)  # recover_states rewound them
        try:
            return super().one_step_descent(batch)
        finally:
            if self._encoder_pass == "replay":
                self._kept_forward = None
            self._encoder_pass = None

    def _reuses_encoder_forward(self) -> bool:
        """Algorithm 1 with roll-back: the real lower step (line 5) runs on the tentative step's batch at the
        tentative step's starting parameters; only the codebook has moved. The encoder's forward is the same,
        so the tentative step keeps its graph and the real step runs only the quantizer, the decoder and the
        backward (README, Performance). Only the plain case qualifies: one unrolled step, no gradient
        accumulation, this level's loss being Eq. 6, and no level below (whose paths differentiate this loss)."""
        encoder = getattr(self.model, "encoder", None)
        return (self._roll_back and self._training and encoder is not None and self._unroll_steps == 1
                and self.gas == 1 and not self._paths and type(self).loss_terms is Level.loss_terms
                and self._trains(encoder))

    @in_phase("backward")  # an upper level's backward includes its hypergradient, which has its own phase
    def backward(self, loss, params, paths, create_graph=False, retain_graph=True, allow_unused=True):
        if self._encoder_pass is None:
            return super().backward(loss, params, paths, create_graph, retain_graph, allow_unused)
        # The kept forward ran on stand-ins of the encoder's parameters: differentiate with respect to them
        # and hand their gradients to the parameters. The tentative step keeps the graph for the real step.
        stand_ins = self._kept_forward.stand_ins
        inputs = [stand_ins.get(p, p) for p in params]
        super().backward(loss, inputs, paths, create_graph, retain_graph or self._encoder_pass == "record", allow_unused)
        for p, s in zip(params, inputs):
            if s is not p and s.grad is not None:
                p.grad = s.grad if p.grad is None else p.grad + s.grad
                s.grad = None

    @in_phase("optimizer_step")
    def optimizer_step(self, *args, **kwargs):
        return super().optimizer_step(*args, **kwargs)

    def remember_pre_step(self) -> None:
        if self.xi_follows_lr:
            # The lr the coming optimizer step uses. Betty steps the scheduler right after the tentative step,
            # before the upper level computes Eq. 13, so it must be read now. The first group holds the
            # level's own parameters at the level's lr (later groups are quantizer lr scales, param_groups).
            self.xi = self.optimizer.param_groups[0]["lr"]
        params = self.trainable_parameters()
        if self._pre_step is None:
            self._pre_step = [torch.empty_like(p) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(self._pre_step, params)

    # Betty's ImplicitProblem deep-copies the module's and the optimizer's state_dict every iteration when
    # roll-back is on (allocation + pickling-like copies of every tensor). The same states are saved here into
    # buffers allocated once and refilled by one fused copy, which restores exactly what load_state_dict would.
    def _state_tensors(self) -> list[torch.Tensor]:
        if self._state_list is None:  # fixed once built, like trainable_parameters
            self._state_list = [*self.module.parameters(), *self.module.buffers()]
        return self._state_list

    @in_phase("roll_back")
    def cache_states(self):
        tensors = self._state_tensors()
        if self._state_cache is None or len(self._state_cache) != len(tensors):
            self._state_cache = [torch.empty_like(t) for t in tensors]
        saved, live = list(self._state_cache), list(tensors)
        old = self._opt_cache or {"state": {}}
        cache = {"groups": [], "state": {}}
        if self.optimizer is not None:
            cache["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    state = self.optimizer.state.get(p)
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

    @in_phase("roll_back")
    def recover_states(self, clean=True):
        # (``clean`` is Betty's flag for dropping its deep copies; the buffers here are kept for the next iteration.)
        live, saved = list(self._state_tensors()), list(self._state_cache)
        if self.optimizer is not None:
            for group, groups_saved in zip(self.optimizer.param_groups, self._opt_cache["groups"]):
                group.update(groups_saved)
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    entry = self._opt_cache["state"].get(p)
                    if entry is None:
                        self.optimizer.state.pop(p, None)
                        continue
                    state = self.optimizer.state[p]
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

    @property
    def pre_step_parameters(self) -> list[torch.Tensor]:
        if self._pre_step is None:
            raise RuntimeError(f"level '{self.name}' has not taken a tentative step yet")
        return self._pre_step
