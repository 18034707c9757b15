"""The quantizer family: nearest-code VQ with Huh et al.'s options (``vq``) and Gumbel-VQ (``gumbel``).

Import the public names from here (``from mqvae.quantizers import build_quantizer``).
"""

from .affine import LearnedAffine, RunningAffine
from .base import Quantizer, QuantizerOutput, batch_perplexity, from_vectors, straight_through, to_vectors
from .build import build_quantizer, check_quantizer_config
from .gumbel import GumbelQuantizer
from .vq import VectorQuantizer

__all__ = [
    "GumbelQuantizer", "LearnedAffine", "Quantizer", "QuantizerOutput", "RunningAffine", "VectorQuantizer",
    "batch_perplexity", "build_quantizer", "check_quantizer_config", "from_vectors", "straight_through", "to_vectors",
]
