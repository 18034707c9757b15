"""Data sets and the batch stream: ``mqvae.data.datasets`` (the registered data sets, ``data.name``) and
``mqvae.data.loader`` (``BatchStream``, the seeded, restartable stream of batches every level draws from).

``from mqvae.data import register_dataset, Datasets`` is how a plugin adds a data set (README "Plugins").
"""

from mqvae.data.datasets import (IMAGE_FOLDER_SIZE, PIXELS, Datasets, InRange, SquareImages, holdout_split,
                                  load_datasets, read_idx, register_dataset, to_pixels, to_range)
from mqvae.data.loader import BatchStream
from mqvae.registry import DATASETS

__all__ = ["BatchStream", "DATASETS", "Datasets", "IMAGE_FOLDER_SIZE", "InRange", "PIXELS", "SquareImages",
           "holdout_split", "load_datasets", "read_idx", "register_dataset", "to_pixels", "to_range"]
