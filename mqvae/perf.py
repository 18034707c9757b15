"""Moved to ``mqvae.runtime.perf``; this path re-exports the names plugins use for one release (docs/design.md, "The map")."""

import warnings

from mqvae.runtime.perf import phase

__all__ = ['phase']

warnings.warn("mqvae.perf moved to mqvae.runtime.perf; import from there", DeprecationWarning, stacklevel=2)
