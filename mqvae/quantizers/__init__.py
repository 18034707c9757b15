"""Moved to ``mqvae.nn.quantizers``; this path re-exports the quantizer classes for one release (docs/design.md, "The map")."""

import warnings

from mqvae.nn.quantizers import GumbelQuantizer, LearnedAffine, Quantizer, QuantizerOutput, RunningAffine, VectorQuantizer

__all__ = ['GumbelQuantizer', 'LearnedAffine', 'Quantizer', 'QuantizerOutput', 'RunningAffine', 'VectorQuantizer']

warnings.warn("mqvae.quantizers moved to mqvae.nn.quantizers; import from there", DeprecationWarning, stacklevel=2)
