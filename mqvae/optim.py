"""Moved to ``mqvae.method.optim``; this path re-exports the names plugins use for one release (docs/design.md, "The map")."""

import warnings

from mqvae.method.optim import OPTIMIZERS, SCHEDULERS, register_optimizer, register_scheduler

__all__ = ['OPTIMIZERS', 'SCHEDULERS', 'register_optimizer', 'register_scheduler']

warnings.warn("mqvae.optim moved to mqvae.method.optim; import from there", DeprecationWarning, stacklevel=2)
