"""A level's optimizer and learning-rate schedule, by the names ``levels.*.optimizer`` and ``levels.*.scheduler``.

Both are registries (``mqvae.registry``): ``register_optimizer(name)`` adds ``factory(level, params) -> Optimizer``
and ``register_scheduler(name)`` adds ``factory(level, total_iters) -> multiplier``, ``level`` being the level's
``LevelConfig``. A schedule is a multiplier of the level's base learning rate at a step (``LambdaLR``'s
``lr_lambda``), or ``None`` for a constant rate: Betty rebuilds a level's optimizer from its defaults and param
groups, and its ``LambdaLR`` from the multiplier, so these are the parts that survive. A multiplier must be a
picklable object, not a lambda, for ``LambdaLR`` to save it in the checkpoint.
"""

from __future__ import annotations

import math

import torch

from mqvae.registry import OPTIMIZERS, SCHEDULERS


def register_optimizer(name: str):
    """Decorator: ``factory(level: LevelConfig, params) -> torch.optim.Optimizer`` as ``levels.*.optimizer: name``."""
    return OPTIMIZERS.register(name)


def register_scheduler(name: str):
    """Decorator: ``factory(level: LevelConfig, total_iters: int) -> multiplier or None`` as
    ``levels.*.scheduler: name``."""
    return SCHEDULERS.register(name)


def make_optimizer(level, params) -> torch.optim.Optimizer:
    return OPTIMIZERS[level.optimizer](level, params)


def make_scheduler(level, optimizer, total_iters: int):
    multiplier = SCHEDULERS[level.scheduler](level, total_iters)
    return None if multiplier is None else torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def _adam_settings(level) -> dict:
    """levels.*.betas and eps where set; torch's defaults otherwise."""
    return {**({"betas": tuple(level.betas)} if level.betas is not None else {}),
            **({"eps": level.eps} if level.eps is not None else {})}


@register_optimizer("adam")
def adam(level, params):
    # fused: one kernel over all tensors instead of ~10 small ops per tensor (torch's default on the CPU);
    # 0.37 instead of 1.65 ms for the digits model's 197k parameters on the 2-core CPU. Same update, up to
    # floating-point rounding.
    return torch.optim.Adam(params, lr=level.lr, weight_decay=level.weight_decay, fused=True, **_adam_settings(level))


@register_optimizer("adamw")
def adamw(level, params):
    return torch.optim.AdamW(params, lr=level.lr, weight_decay=level.weight_decay, fused=True, **_adam_settings(level))


@register_optimizer("sgd")
def sgd(level, params):
    return torch.optim.SGD(params, lr=level.lr, momentum=level.momentum, weight_decay=level.weight_decay)


class LRSchedule:
    """Multiplier of the base learning rate at a step: cosine, or linear warm-up then cosine (the MQ-VAE paper's
    schedule, App. I), annealing to ``floor`` times the base rate (``levels.*.min_lr`` / ``lr``)."""

    def __init__(self, kind: str, total: int, warmup_ratio: float, floor: float = 0.0):
        self.kind, self.total, self.warmup = kind, total, int(round(warmup_ratio * total)) if kind == "warmup_cosine" else 0
        self.floor = floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@register_scheduler("constant")
def constant(level, total_iters):
    return None


@register_scheduler("cosine")
def cosine(level, total_iters):
    return LRSchedule("cosine", total_iters, level.warmup_ratio, level.min_lr / level.lr)


@register_scheduler("warmup_cosine")
def warmup_cosine(level, total_iters):
    return LRSchedule("warmup_cosine", total_iters, level.warmup_ratio, level.min_lr / level.lr)


class DeviceSchedule:
    """A level's ``LambdaLR`` with its learning rates on the device, for ``perf.cuda_graphs`` (engines.graphs).

    A captured optimizer step replays the same kernels on the same memory: an lr that ``LambdaLR`` writes as a new
    host number at each step would be baked into the graph at its capture-time value. Here each group's lr is a
    0-dim tensor on the device that the step reads, and ``step`` refills it, on the device, from a table of
    ``base_lr · multiplier(k)`` (the ``LambdaLR``'s, k = 0..steps) at a step counter held on the device too. The
    values are the eager schedule's, rounded to float32. The ``LambdaLR`` stays for checkpoints: ``state_dict`` is
    its state at ``last_epoch``, so a checkpoint resumes in either mode."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int):
        self.scheduler = scheduler
        self.optimizer = scheduler.optimizer
        groups = self.optimizer.param_groups
        device = groups[0]["params"][0].device
        self.last_epoch = scheduler.last_epoch
        rows = [self._host_lrs(k) for k in range(max(steps, self.last_epoch) + 1)]
        self.table = torch.tensor(rows, dtype=torch.float32, device=device)
        self.counter = torch.tensor(self.last_epoch, dtype=torch.long, device=device)
        self.lrs = [torch.tensor(float(group["lr"]), dtype=torch.float32, device=device) for group in groups]
        for group, lr in zip(groups, self.lrs):
            group["lr"] = lr
        self._refill()

    def _host_lrs(self, k: int) -> list[float]:
        return [base * multiplier(k) for base, multiplier in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]

    def _refill(self) -> None:
        # (Past the table's end the last row: the multipliers are flat after their total.)
        row = self.table.index_select(0, self.counter.clamp(max=self.table.shape[0] - 1).view(1)).view(-1)
        torch._foreach_copy_(self.lrs, list(row.unbind(0)))

    def step(self) -> None:
        self.last_epoch += 1
        self.counter.add_(1)
        self._refill()

    def get_last_lr(self) -> list[float]:
        return self._host_lrs(self.last_epoch)

    def state_dict(self) -> dict:
        self.scheduler.last_epoch, self.scheduler._step_count = self.last_epoch, self.last_epoch + 1
        self.scheduler._last_lr = self.get_last_lr()
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
        self.last_epoch = self.scheduler.last_epoch
        self.counter.fill_(self.last_epoch)
        self._refill()
