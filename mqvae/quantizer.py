"""Vector quantizers (the implementation lives in the package ``mqvae.quantizers``).

A quantizer's forward is pure: it returns a ``QuantizerOutput`` and changes
nothing. Codebook maintenance (data-dependent init, dead-code replacement,
running statistics) is an explicit call the training loop makes, so that the
hypergradient's perturbed evaluations can run the quantizer with nothing updated.
"""

from .quantizers import (  # noqa: F401 - re-exported public names
    GumbelQuantizer,
    LearnedAffine,
    Quantizer,
    QuantizerOutput,
    RunningAffine,
    VectorQuantizer,
    batch_perplexity,
    build_quantizer,
    check_quantizer_config,
    from_vectors,
    straight_through,
    to_vectors,
)

__all__ = [
    "GumbelQuantizer", "LearnedAffine", "Quantizer", "QuantizerOutput", "RunningAffine", "VectorQuantizer",
    "batch_perplexity", "build_quantizer", "check_quantizer_config", "from_vectors", "straight_through", "to_vectors",
]
