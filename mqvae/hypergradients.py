"""Moved to ``mqvae.method.hypergradients``; this path re-exports the names plugins use for one release (docs/design.md, "The map")."""

import warnings

from mqvae.method.hypergradients import HypergradientContext, TYPES, mqvae, register_hypergradient

__all__ = ['HypergradientContext', 'TYPES', 'mqvae', 'register_hypergradient']

warnings.warn("mqvae.hypergradients moved to mqvae.method.hypergradients; import from there", DeprecationWarning, stacklevel=2)
