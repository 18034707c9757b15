"""The base of every level: a Betty ``ImplicitProblem`` that trains one part of a shared ``VQModel``.

All levels evaluate the same loss (MQ-VAE Eq. 6, ``VQModel.loss``); a level
differs from another only in the parameters it trains, the batches it sees and
its optimizer. Subclasses say which part of the model they train
(``module_of``) and may override the loss (``loss_terms``).
"""

from __future__ import annotations

import inspect

import torch
from betty.problems import ImplicitProblem


class Level(ImplicitProblem):
    def __init__(self, name, config, module, optimizer, scheduler, train_data_loader, *, model, level_cfg, xi=0.0, fd_alpha=0.01):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader)
        self.model = model
        self.level_cfg = level_cfg
        # Eq. 10's xi and Eq. 13's finite-difference radius, read by the hypergradient of this level's
        # best response (mqvae.hypergradients) when this level sits below another.
        self.xi = xi
        self.fd_alpha = fd_alpha
        self.batch_source = None  # a lower level whose batch this level reuses (data: shared)
        self.last_stats: dict = {}
        self.last_forward = None  # (z_e, quantizer output) of the latest real step, for quantizer maintenance
        self.stream = train_data_loader
        self._pre_step: list[torch.Tensor] | None = None
        # Roll-back cache (Algorithm 1, line 5): preallocated once, filled by copy_ every iteration.
        self._state_cache: list[torch.Tensor] | None = None
        self._opt_cache: dict | None = None

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
        if quantizer is None or not hasattr(quantizer, "param_groups") or not any(m is quantizer for m in self.module.modules()):
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
        return [p for p in self.module.parameters() if p.requires_grad]

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
        finite-difference passes would be wasted (DESIGN.md, cost model).
        """
        if upper.module is getattr(self.model, "quantizer", None) and self._codebook_needs_encoder_only():
            return self.model.quantization_terms(batch)["loss"]
        return self.training_step(batch)

    def _codebook_needs_encoder_only(self) -> bool:
        quantizer = getattr(self.model, "quantizer", None)
        return (quantizer is not None and hasattr(self.model, "encoder") and not quantizer.task_reaches_codebook
                and not self.loss_weights())

    # -- Betty hooks ------------------------------------------------------------------------------
    def get_loss(self, batch):
        # Betty's version calls loss.item() every step, a host sync in the hot loop; keep tensors and
        # let the engine read them at logging steps only.
        if self._steps_on_quantization_loss():
            stats = self.model.quantization_terms(batch)
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
        skips the decoder (DESIGN.md cost model: ~1.1x instead of ~1.33x). Its logged ``loss`` is then that
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
        return super().one_step_descent(batch)

    def remember_pre_step(self) -> None:
        params = self.trainable_parameters()
        with torch.no_grad():
            if self._pre_step is None:
                self._pre_step = [torch.empty_like(p) for p in params]
            for saved, p in zip(self._pre_step, params):
                saved.copy_(p)

    # Betty's ImplicitProblem deep-copies the module's and the optimizer's state_dict every iteration when
    # roll-back is on (allocation + pickling-like copies of every tensor). The same states are saved here into
    # buffers allocated once and refilled with copy_, which restores exactly what load_state_dict would.
    def _state_tensors(self) -> list[torch.Tensor]:
        return [*self.module.parameters(), *self.module.buffers()]

    def cache_states(self):
        with torch.no_grad():
            tensors = self._state_tensors()
            if self._state_cache is None or len(self._state_cache) != len(tensors):
                self._state_cache = [torch.empty_like(t) for t in tensors]
            for saved, t in zip(self._state_cache, tensors):
                saved.copy_(t)
            if self.optimizer is None:
                return
            old = self._opt_cache or {"state": {}}
            cache = {"groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups],
                     "state": {}}
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
                            entry[name] = buf.copy_(value)
                        else:
                            entry[name] = value
                    cache["state"][p] = entry
            self._opt_cache = cache

    def recover_states(self, clean=True):
        with torch.no_grad():
            for saved, t in zip(self._state_cache, self._state_tensors()):
                t.copy_(saved)
            if self.optimizer is None:
                return
            for group, saved in zip(self.optimizer.param_groups, self._opt_cache["groups"]):
                group.update(saved)
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
                        if torch.is_tensor(value):
                            if torch.is_tensor(current) and current.shape == value.shape and current.dtype == value.dtype:
                                current.copy_(value)
                            else:
                                state[name] = value.clone()
                        else:
                            state[name] = value
        # (``clean`` is Betty's flag for dropping its deep copies; the buffers here are kept for the next iteration.)

    @property
    def pre_step_parameters(self) -> list[torch.Tensor]:
        if self._pre_step is None:
            raise RuntimeError(f"level '{self.name}' has not taken a tentative step yet")
        return self._pre_step
