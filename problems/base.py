"""The base of every level: a Betty ``ImplicitProblem`` that trains one part of a shared ``VQModel``.

All levels evaluate the same loss (MQ-VAE Eq. 6, ``VQModel.loss``); a level
differs from another only in the parameters it trains, the batches it sees and
its optimizer. Subclasses say which part of the model they train
(``module_of``) and may override the loss (``loss_terms``).
"""

from __future__ import annotations

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

    # -- what the level trains --------------------------------------------------------------
    @classmethod
    def module_of(cls, model) -> torch.nn.Module:
        """The part of ``model`` whose parameters this level trains."""
        raise NotImplementedError

    def param_groups(self):
        """Optimizer parameter groups (Betty rebuilds the optimizer from these)."""
        return [{"params": [p for p in self.module.parameters() if p.requires_grad]}]

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
        codebook's gradient needs only an encoder forward and the quantizer's losses: the decoder
        forward of the finite-difference passes would be wasted (DESIGN.md, cost model).
        """
        quantizer = getattr(self.model, "quantizer", None)
        if quantizer is not None and upper.module is quantizer and not quantizer.task_reaches_codebook:
            return self.model.quantization_loss(batch)
        return self.training_step(batch)

    # -- Betty hooks ------------------------------------------------------------------------------
    def get_loss(self, batch):
        # Betty's version calls loss.item() every step, a host sync in the hot loop; keep tensors and
        # let the engine read them at logging steps only.
        stats = self.loss_terms(batch)
        out = stats.pop("_out", None)
        if out is not None:
            self.last_forward = (out.z_e.detach(), out.quant.detached())
        self.last_stats = {k: v.detach() for k, v in stats.items()}
        return stats["loss"] / self.gas, self.last_stats

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

    @property
    def pre_step_parameters(self) -> list[torch.Tensor]:
        if self._pre_step is None:
            raise RuntimeError(f"level '{self.name}' has not taken a tentative step yet")
        return self._pre_step
