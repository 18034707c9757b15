"""Data sets and the batch stream: ``mqvae.data.datasets`` (the registered data sets, ``data.name``) and
``mqvae.data.loader`` (``BatchStream``, the seeded, restartable stream of batches every level draws from).

``from mqvae.data import register_dataset, Datasets`` is how a plugin adds a data set (README "Plugins").
"""

from mqvae.data.datasets import IMAGE_FOLDER_SIZE, Datasets, holdout_split, load_datasets, read_idx, register_dataset
from mqvae.data.loader import BatchStream
from mqvae.registry import DATASETS

__all__ = ["BatchStream", "DATASETS", "Datasets", "IMAGE_FOLDER_SIZE", "holdout_split", "load_datasets", "read_idx",
           "register_dataset"]
