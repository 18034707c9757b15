"""Betty Problems: one class per level kind, and the registry configs name them by."""

import mqvae.shipped  # noqa: F401  the shipped data sets, kinds and methods, which a config may name

from .base import FastRollBack, Level
from .levels import (PROBLEMS, AutoEncoder, Classifier, Codebook, CommitmentWeight, Decoder, Encoder, Prior, VQVAE,
                     register_problem)

__all__ = ["Level", "FastRollBack", "PROBLEMS", "register_problem", "VQVAE", "AutoEncoder", "Classifier", "Codebook",
           "CommitmentWeight", "Encoder", "Decoder", "Prior"]
