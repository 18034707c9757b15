"""A deterministic, resumable stream of mini-batches.

Betty pulls batches with ``next()`` on ``iter(loader)`` and calls ``iter(loader)``
again after ``StopIteration``. A checkpoint must resume at exactly the next
batch, so each epoch's order is a pure function of ``(seed, epoch)`` (never the
global RNG) and the stream counts how many batches it has handed out. A data set
with ``random_crop`` (``datasets.SquareImages``) gets each item's crop from the
same generator: a pure function of ``(seed, epoch, index)``, whatever the
DataLoader workers or the data-parallel shard.

The stream hands out batches on its ``device``; this module is the one place
where training batches reach it (``data.on_device``). A tensor set that lives
on the device (``place``) is gathered there by index; any other set is gathered
on the host and, on CUDA, copied from pinned memory on a side stream, one batch
ahead. The indices are the same in every case, so the batches are too.
"""

import math

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from mqvae.errors import UserError

# Spreads consecutive epochs of nearby seeds over distinct generator seeds.
_EPOCH_STRIDE = 100003

# data.on_device: auto puts a tensor set on a CUDA device when it takes at most this share of the device's free
# memory, measured once the model is there. The rest is the training's: activations, Eq. 13's extra passes, optimizer
# states, the evaluation. A quarter keeps the sets the paper trains on small against it (digits 1.5 MB, MNIST 188 MB,
# CIFAR-10 as float32 614 MB) while leaving three quarters to the training step, which is what runs out first.
ON_DEVICE_SHARE = 0.25


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


def _indexed(device) -> torch.device:
    """``device`` with its index: a tensor on "cuda" is on "cuda:<current>", and devices compare by both."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _pinned_gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor``'s rows at ``index``, written into page-locked host memory, from which a copy to CUDA is asynchronous."""
    out = torch.empty((len(index), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True)
    return torch.index_select(tensor, 0, index, out=out)


def to_move(dataset: Dataset, on_device, device, name: str) -> bool:
    """Whether ``data.on_device`` (``True``, ``False`` or ``"auto"``) moves ``dataset`` (the training split of data set
    ``name``) to ``device``; one UserError line where ``True`` cannot be honoured.

    Only a tensor set moves. Every other set is read item by item (decoded files, random crops, a user's own reading),
    which the stream must keep doing to give the same items, so it is not materialised. ``auto`` moves a tensor set to
    a CUDA device where it takes at most ``ON_DEVICE_SHARE`` of the free memory, ``True`` where it fits at all. On the
    CPU the data is already in the device's memory: nothing moves, whatever the value."""
    if not isinstance(dataset, TensorDataset):
        if on_device is True:
            raise UserError(f"data.on_device: true, but the training set of {name} is read item by item "
                            f"({type(dataset).__name__}: decoded or cropped as each item is read), not held as tensors; "
                            "only a set loaded as a TensorDataset (digits, mnist, fashion_mnist) can live on the "
                            "device; set data.on_device to auto or false")
        return False
    if torch.device(device).type != "cuda" or on_device is False:
        return False
    size = sum(t.numel() * t.element_size() for t in dataset.tensors)
    free, _ = torch.cuda.mem_get_info(device)
    if on_device is True and size > free:
        raise UserError(f"data.on_device: true, but the training set of {name} ({size / 2**30:.3g} GiB) is larger than "
                        f"the {free / 2**30:.3g} GiB free on {device}; set data.on_device to auto or false")
    return on_device is True or size <= ON_DEVICE_SHARE * free


def place(dataset: Dataset, on_device, device, name: str) -> Dataset:
    """``dataset`` where its batch streams gather from it: on ``device`` as one tensor per field where ``to_move``
    says so, else as it is."""
    if to_move(dataset, on_device, device, name):
        return TensorDataset(*(t.to(device) for t in dataset.tensors))
    return dataset


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
        device="cpu",
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
        # Where the batches are handed out. A tensor set whose tensors are there (``place``; on the CPU, every tensor
        # set) is gathered there; any other on the host, then copied (``_copied``).
        self.device = _indexed(device)
        self.on_device = isinstance(dataset, TensorDataset) and all(t.device == self.device for t in dataset.tensors)
        self._copies = None  # the CUDA stream of the copies from the host, made at the first one
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
        """The batches at ``batches`` (``_epoch_batches``' indices), on the stream's device."""
        cuda = self.device.type == "cuda"
        tensors = self.dataset.tensors if isinstance(self.dataset, TensorDataset) else None
        if self.on_device:
            # One gather per tensor where the set lives. The epoch's indices go there in one copy (on CUDA from pinned
            # memory, without blocking the host); each batch's are a slice of them.
            if batches:
                order = torch.cat(batches)
                if cuda:
                    order = order.pin_memory().to(self.device, non_blocking=True)
                batches = order.split([len(idx) for idx in batches])
            return (tuple(t.index_select(0, idx) for t in tensors) for idx in batches)
        if tensors is not None:
            # A tensor set kept on the host (data.on_device: false, on CUDA): gathered straight into pinned memory.
            loaded = (tuple(_pinned_gather(t, idx) for t in tensors) for idx in batches)
        else:
            loaded = DataLoader(
                _Guarded(self.dataset),
                batch_sampler=[idx if isinstance(idx, list) else idx.tolist() for idx in batches],
                num_workers=self.num_workers,
                collate_fn=_collate,
                pin_memory=cuda,
            )
        return self._copied(loaded) if cuda else loaded

    def _copied(self, loaded):
        """The host batches ``loaded`` (pinned) copied to the CUDA device on a stream of their own, one batch ahead:
        the copy of the next batch is under way while the step computes on this one. The step's stream waits for a
        batch's own copy only (an event recorded after it), and the batch's memory is marked as used by that stream, so
        the allocator reuses it only after the step is done with it. A failed read passes through in its place."""
        if self._copies is None:
            self._copies = torch.cuda.Stream(self.device)
        pending = None
        for batch in loaded:
            if not isinstance(batch, _Failed):
                with torch.cuda.stream(self._copies):
                    batch = tuple(t.to(self.device, non_blocking=True) if torch.is_tensor(t) else t for t in batch)
                batch = (batch, self._copies.record_event())
            if pending is not None:
                yield self._arrived(pending)
            pending = batch
        if pending is not None:
            yield self._arrived(pending)

    def _arrived(self, copied):
        """A copied batch, handed to the step's stream (``_copied``)."""
        if isinstance(copied, _Failed):
            return copied
        batch, event = copied
        step = torch.cuda.current_stream(self.device)
        step.wait_event(event)
        for t in batch:
            if torch.is_tensor(t):
                t.record_stream(step)
        return batch

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
