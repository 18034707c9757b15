"""A deterministic, resumable stream of mini-batches.

Betty pulls batches with ``next()`` on ``iter(loader)`` and calls ``iter(loader)``
again after ``StopIteration``. A checkpoint must resume at exactly the next
batch, so each epoch's order is a pure function of ``(seed, epoch)`` (never the
global RNG) and the stream counts how many batches it has handed out. A data set
with ``random_crop`` (``datasets.SquareImages``) gets each item's crop from the
same generator: a pure function of ``(seed, epoch, index)``, whatever the
DataLoader workers or the data-parallel shard.
"""

import math

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from mqvae.errors import UserError

# Spreads consecutive epochs of nearby seeds over distinct generator seeds.
_EPOCH_STRIDE = 100003


class _Failed:
    """A UserError raised while reading an item, carried back from a DataLoader worker as data: torch
    re-raises a worker's exception with the worker's traceback in its message, no longer one line."""

    def __init__(self, message: str):
        self.message = message


class _Guarded(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except UserError as exc:
            return _Failed(str(exc))


def _collate(items: list):
    return next((item for item in items if isinstance(item, _Failed)), None) or default_collate(items)


class BatchStream:
    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        shard: tuple[int, int] = (0, 1),
    ):
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if drop_last and batch_size > len(dataset):
            raise UserError(
                f"batch_size {batch_size} exceeds the {len(dataset)} items of the data set, so no full batch exists; "
                "lower batch_size"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        # (rank, ranks): a data-parallel rank's share of each batch. The batches are those of one process with
        # batch_size, split into equal consecutive slices, so the ranks' slices in rank order are that process's
        # batch and a resumed stream is at the same batch on every rank.
        self.rank, self.ranks = shard
        if batch_size % self.ranks:
            raise UserError(f"batch_size {batch_size} does not split over {self.ranks} ranks")
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _epoch_batches(self) -> list:
        """This rank's share of each batch of the epoch: index tensors, or for a data set with ``random_crop`` lists
        of ``(index, (u, v))``, the crop's two uniform draws (``datasets.SquareImages``)."""
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed * _EPOCH_STRIDE + self.epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        share = self.batch_size // self.ranks
        batches = [batch[self.rank * share:(self.rank + 1) * share] for batch in list(order.split(self.batch_size))[: len(self)]]
        if not getattr(self.dataset, "random_crop", False):
            return batches
        # Drawn after the order, for every item of the data set: the order is that of a stream without crops, and an
        # item's draws depend on the seed, the epoch and its index alone, not on the batch, the rank or a worker.
        draws = torch.rand(n, 2, dtype=torch.float64, generator=generator)
        return [list(zip(idx.tolist(), map(tuple, draws[idx].tolist()))) for idx in batches]

    def _load(self, batches: list):
        if isinstance(self.dataset, TensorDataset):
            # Fast path: one gather per tensor instead of per-item Python calls.
            return (tuple(t[idx] for t in self.dataset.tensors) for idx in batches)
        return DataLoader(
            _Guarded(self.dataset),
            batch_sampler=[idx if isinstance(idx, list) else idx.tolist() for idx in batches],
            num_workers=self.num_workers,
            collate_fn=_collate,
        )

    def __iter__(self):
        # A generator: nothing is read until the first next(), so a state loaded
        # after iter() but before the first batch is still honoured.
        for batch in self._load(self._epoch_batches()[self.position :]):
            if isinstance(batch, _Failed):
                raise UserError(batch.message)
            # Count before handing out: once the consumer holds the batch it is
            # consumed, whatever DataLoader workers have prefetched beyond it.
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Betty's distributed strategy calls this at each epoch's end; the stream counts its epochs itself."""

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= state["position"] <= len(self):
            raise UserError(
                f"checkpoint's batch position {state['position']} is outside the {len(self)} batches per epoch of "
                "this run; resume with the data set and batch_size the checkpoint was trained with"
            )
        self.epoch = state["epoch"]
        self.position = state["position"]
