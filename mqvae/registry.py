"""Registries: the names a config may give for one kind of choice, and how a user adds a name.

Every choice a user can extend is a ``Registry``: ``data.name`` (``mqvae.data.DATASETS``), ``hypergradient.type``
(``mqvae.hypergradients.TYPES``), ``levels.*.optimizer`` and ``levels.*.scheduler`` (``mqvae.optim``) and
``levels.*.problem`` (``PROBLEMS`` below, filled by ``problems.register_problem``). The config is validated against
them (``mqvae.config``), so what is registered, by the toolkit or by a user's module (``imports``), is exactly
what a config may name, and an unknown name gets one message listing them.

``PROBLEMS`` lives here, below the ``problems`` package that fills it, so that the config can be validated without
importing the levels (imports point one way, ``problems -> mqvae``); a level kind is known once its module is
imported, which ``engines`` (the shipped levels) and ``imports`` (a user's) do before any config is read.
"""

from __future__ import annotations

import difflib

from .errors import UserError


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
        from .config import quote

        listed = ", ".join(sorted(self)) or "none"
        return (f"{quote(name)} is not a registered {self.kind}; {did_you_mean(str(name), self)}registered: {listed} "
                f"(a new one is registered with {self.register_with}, in a module the config names under imports: "
                "or run.py --import)")


def _origin(value) -> str:
    """Where a registered object is defined, module and qualified name: the same definition imported twice (a
    plugin loaded as a file and as a module) is the same registration."""
    return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__qualname__)}"


# levels.*.problem -> a problems.Level subclass (problems.register_problem).
PROBLEMS = Registry("problem", "problems.register_problem")
