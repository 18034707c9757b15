"""The quantizer family: nearest-code VQ with Huh et al.'s options (``VectorQuantizer``) and Gumbel-VQ
(``GumbelQuantizer``). Built from a config by ``mqvae.method.models.build_quantizer``.
"""

from mqvae.nn.quantizers.affine import LearnedAffine, RunningAffine
from mqvae.nn.quantizers.base import (Quantizer, QuantizerOutput, batch_perplexity, code_counts, from_vectors,
                                      straight_through, to_vectors)
from mqvae.nn.quantizers.gumbel import GumbelQuantizer
from mqvae.nn.quantizers.vq import VectorQuantizer

__all__ = [
    "GumbelQuantizer", "LearnedAffine", "Quantizer", "QuantizerOutput", "RunningAffine", "VectorQuantizer",
    "batch_perplexity", "code_counts", "from_vectors", "straight_through", "to_vectors",
]
