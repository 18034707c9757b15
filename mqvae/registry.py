"""Every registry: the names a config may give for one kind of choice, and how a user adds a name.

A leaf module (it imports only ``mqvae.errors``): the modules that define what a name stands for register into it,
and the config is validated against it alone (``mqvae.config``), so what is registered, by the toolkit or by a
user's module (``imports``), is exactly what a config may name, and an unknown name gets one message listing them.

============================  =====================  ==============================================================
config key                    registry               filled by
============================  =====================  ==============================================================
``data.name``                 ``DATASETS``           ``mqvae.data.register_dataset``
``model.kind``                ``MODELS``             ``mqvae.method.models.register_model`` (a ``ModelKind``)
``quantizer.kind``            ``QUANTIZERS``         ``mqvae.method.models.register_quantizer`` (a ``Quantizer``)
``levels.*.problem``          ``PROBLEMS``           ``problems.register_problem``
``hypergradient.type``        ``HYPERGRADIENTS``     ``mqvae.method.hypergradients.register_hypergradient``
``levels.*.optimizer``        ``OPTIMIZERS``         ``mqvae.method.optim.register_optimizer``
``levels.*.scheduler``        ``SCHEDULERS``         ``mqvae.method.optim.register_scheduler``
============================  =====================  ==============================================================

Three more hold what the config's checks and the reports look up by name: ``TASKS`` (a run's task by its name,
e.g. the prior's, ``mqvae.method.tasks``), ``VALIDATORS`` (a config section with checks of its own that need more
than the config's text, e.g. ``prior.run``: a function ``check(cfg, where)`` that the config's validation calls) and
``HYPERGRADIENT_TRAITS`` (what a hypergradient method's registration said it supports).

A name is known once the module that registers it is imported: ``mqvae.shipped`` imports every shipped one (and
``problems``, hence ``engines``, imports it), a user's module is imported from ``imports:`` or ``--import``.
"""

from __future__ import annotations

import difflib

from mqvae.errors import UserError, quote


def did_you_mean(value: str, choices) -> str:
    """The hint of an unknown name: the closest choice, also one that differs only in case (CodeBook)."""
    close = difflib.get_close_matches(value, list(choices), n=1) or [
        c for c in choices if c.lower() == value.lower()]
    return f"did you mean '{close[0]}'? " if close else ""


class Registry(dict):
    """name -> what the name stands for (a class, a loader, a factory), for one kind of config choice."""

    def __init__(self, kind: str, register_with: str):
        super().__init__()
        self.kind = kind  # "data set", "problem", ...: how messages name an entry
        self.register_with = register_with  # the call that adds one, for the messages

    def copy(self) -> "Registry":
        copied = Registry(self.kind, self.register_with)
        copied.update(self)
        return copied

    def add(self, name: str, value) -> None:
        """Register ``value`` under ``name``. Registering the same object again is a no-op (a module imported
        twice); another object under a taken name is an error, as it would silently replace the first."""
        if name in self and self[name] is not value and _origin(self[name]) != _origin(value):
            raise UserError(f"{self.kind} name '{name}' is registered twice (by {_origin(self[name])} and "
                            f"{_origin(value)}); give the new one another name")
        self[name] = value

    def register(self, name: str):
        """A decorator registering what it decorates under ``name``."""

        def register(value):
            self.add(name, value)
            return value

        return register

    def unknown(self, name: str) -> str:
        """The message of a name that is not registered: the closest name, every registered one, how to add one."""
        listed = ", ".join(sorted(self)) or "none"
        return (f"{quote(name)} is not a registered {self.kind}; {did_you_mean(str(name), self)}registered: {listed} "
                f"(a new one is registered with {self.register_with}, in a module the config names under imports: "
                "or run.py --import)")


def _origin(value) -> str:
    """Where a registered object is defined, module and qualified name: the same definition imported twice (a
    plugin loaded as a file and as a module) is the same registration."""
    return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__qualname__)}"


# name -> function(root: str, download: bool, seed: int) -> mqvae.data.Datasets; the built-in sets ignore seed
# (their splits are fixed), a user's set may use it for its own split.
DATASETS = Registry("data set", "mqvae.data.register_dataset")
# model.kind -> a mqvae.method.models.ModelKind subclass: the encoder and decoder halves, and the task they serve.
MODELS = Registry("model kind", "mqvae.method.models.register_model")
# quantizer.kind -> a mqvae.nn.quantizers.Quantizer subclass, built from the quantizer section.
QUANTIZERS = Registry("quantizer kind", "mqvae.method.models.register_quantizer")
# levels.*.problem -> a problems.Level subclass.
PROBLEMS = Registry("problem", "problems.register_problem")
# hypergradient.type -> Betty's get_grads signature, fn(vector, curr, prev, sync) (Betty's own registry also holds
# methods this toolkit does not wire, e.g. reinforce).
HYPERGRADIENTS = Registry("hypergradient method", "mqvae.method.hypergradients.register_hypergradient")
# hypergradient.type -> what its registration said of it (``unroll_steps``, ``graph_safe``), kept by name: one function
# registered under two names with other traits keeps both, which attributes on the function could not.
HYPERGRADIENT_TRAITS: dict[str, dict[str, bool]] = {}
# levels.*.optimizer -> factory(level: LevelConfig, params) -> torch.optim.Optimizer.
OPTIMIZERS = Registry("optimizer", "mqvae.method.optim.register_optimizer")
# levels.*.scheduler -> factory(level: LevelConfig, total_iters: int) -> multiplier or None.
SCHEDULERS = Registry("scheduler", "mqvae.method.optim.register_scheduler")
# task name -> a mqvae.method.tasks.Task instance.
TASKS = Registry("task", "mqvae.registry.TASKS.add")
# config section -> check(cfg, where), run by the config's validation after its own checks.
VALIDATORS = Registry("config validator", "mqvae.registry.VALIDATORS.add")
