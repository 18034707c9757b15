"""Data-parallel training: the process group and the collectives the engine uses.

``torchrun --nproc_per_node=N run.py CONFIG`` starts N processes (ranks) with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address in their environment. N ranks with a per-rank batch of b are one process
with a batch of N*b (MQ-VAE's loss is a mean over the batch, so its gradient is the mean of the ranks' gradients):

- every gradient an optimizer steps on is averaged over the ranks before the step (``average_``);
- v of Eq. 13 is averaged before a hypergradient uses it, so eps = alpha/||v|| is the global one;
- codebook maintenance runs on rank 0 on the whole global batch (``gather``) and its result is broadcast;
- only rank 0 writes the run folder.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every function here is a no-op and nothing is initialized.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from mqvae.errors import UserError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    """This rank's index on its machine (torchrun's LOCAL_RANK): its CUDA device."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched() -> int:
    """The world size torchrun launched this process with (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(backend: str, timeout_s: float, device: str) -> None:
    """Join the process group torchrun set up (``backend``: auto = nccl on CUDA, gloo on the CPU), with this rank's
    CUDA device (LOCAL_RANK) as the current one; nothing without torchrun. ``timeout_s`` bounds every collective, so
    a rank that dies mid-step ends the others instead of leaving them waiting."""
    if launched() <= 1 or dist.is_initialized():
        return
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise UserError("distributed.backend: nccl needs CUDA devices; use gloo (or auto) on the CPU")
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where the backend's collectives take their tensors: NCCL's on this rank's GPU, gloo's on the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce_(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` over the ranks in place, wherever it lives."""
    on = tensor.to(_device())
    dist.all_reduce(on)
    if on is not tensor:
        tensor.copy_(on)


def average_(tensors: list[torch.Tensor]) -> None:
    """Each tensor := its mean over the ranks, in place."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])  # one collective instead of one per tensor
    _all_reduce_(flat)
    flat.div_(world_size())
    torch._foreach_copy_(tensors, [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)])


def average_grads(params: list[torch.Tensor]) -> None:
    """The parameters' gradients := their mean over the ranks (a missing gradient counts as zero)."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    average_([p.grad for p in params])


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors concatenated along dim 0 in rank order: the global batch, as one process would hold it
    (each rank's batch is its slice of the global batch, ``loader.BatchStream``)."""
    if world_size() == 1:
        return tensor
    local = tensor.to(_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` := its sum over the ranks (in place); returns it."""
    if world_size() > 1:
        _all_reduce_(tensor)
    return tensor


def sum_numbers(*numbers: float) -> list[float]:
    """Python numbers summed over the ranks (in float64: counts and sums of a test split's metrics)."""
    if world_size() == 1:
        return list(numbers)
    return sum_(torch.tensor(numbers, dtype=torch.float64)).tolist()


def gather_objects(value) -> list:
    """Every rank's ``value``, in rank order (any picklable object, e.g. tensors of different lengths)."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values into every rank's tensors."""
    if world_size() == 1:
        return
    with torch.no_grad():  # a parameter written in place is no step of autograd's graph
        for t in tensors:
            on = t.to(_device())
            dist.broadcast(on, 0)
            if on is not t:
                t.copy_(on)


def first_difference(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """The first tensor whose values differ between rank 0 and any other rank (bit for bit), or None: every rank
    gets the same answer."""
    if world_size() == 1:
        return None
    differs = torch.zeros(len(named), dtype=torch.int64)
    for i, (_, t) in enumerate(named):
        reference = t.detach().to(_device(), copy=True)
        dist.broadcast(reference, 0)
        differs[i] = int(not torch.equal(reference, t.detach().to(_device())))
    _all_reduce_(differs)
    bad = [name for (name, _), d in zip(named, differs.tolist()) if d]
    return bad[0] if bad else None


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
