"""Test-set evaluation of a ``QuantizedNetwork``: task metrics, code usage, the gradient gap and image quality.

``evaluate`` runs at every ``train.eval_every`` and at the end of a run; the image-quality metrics
(FID / IS / LPIPS, MQ-VAE Table 3) need pretrained networks and a pass over the whole test set, so they
are computed only when an ``ImageQuality`` is passed in, which ``final_metrics`` does once per run.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from mqvae.runtime import distributed
from mqvae.evaluation import metrics as metric_fns
from mqvae.config import EvalConfig
from mqvae.data import InRange, SquareImages, to_pixels
from mqvae.nn.quantizers import to_vectors


def make_image_quality(device, download_weights: bool):
    """The FID / IS / LPIPS accumulator of a run's final evaluation.

    A module-level function so that tests (and users with their own feature networks) can swap in
    stand-in networks: ``ImageQuality(device, fid_feature=..., is_feature=..., lpips_net=...)``.
    Pretrained weights missing from the local cache (fetched only with ``download_weights``), and for LPIPS
    images too small for AlexNet (under ``metrics.LPIPS_MIN_SIDE``: 28-px MNIST, 16-px digits), give ``None``
    with a reason, never a number (``metrics.ImageQuality``).
    """
    return metric_fns.ImageQuality(device, download_weights=download_weights)


def measures_quality(task, settings: EvalConfig) -> bool:
    """Whether an evaluation of ``task`` measures image quality as ``settings`` say (its outputs are images, and
    ``image_quality: auto``)."""
    return task.outputs_images and settings.image_quality == "auto"


@contextmanager
def evaluating(model):
    """``model`` in eval mode (BatchNorm uses its running statistics) inside the block, back in the mode it
    was in afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def first_images(dataset, count: int) -> torch.Tensor:
    """The first ``count`` images of ``dataset`` (all of them if it holds fewer), as one batch."""
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


def labels_of(dataset) -> torch.Tensor | None:
    """The class label of every item of ``dataset``, read without loading an image: a TensorDataset's second
    tensor, torchvision's ``targets`` (ImageFolder, CIFAR, MNIST) or ``labels`` (SVHN), a Subset's of its items,
    and those of the set that ``SquareImages`` and ``InRange`` map item by item. None where the data set keeps no such
    list (CelebA, a user's set), or it is not one integer per item."""
    if isinstance(dataset, (SquareImages, InRange)):
        return labels_of(dataset.dataset)
    if isinstance(dataset, Subset):
        labels = labels_of(dataset.dataset)
        return None if labels is None else labels[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset):
        labels = dataset.tensors[1] if len(dataset.tensors) > 1 else None
    else:
        labels = next((getattr(dataset, name) for name in ("targets", "labels") if hasattr(dataset, name)), None)
        labels = None if labels is None else torch.as_tensor(labels)
    fits = labels is not None and labels.dim() == 1 and len(labels) == len(dataset) and not labels.is_floating_point()
    return labels if fits else None


def shown_indices(dataset, count: int) -> list[int]:
    """The ``count`` items of ``dataset`` a picture shows (all of them if it holds fewer): the classes in turn, the
    first item of each class, then the second, ..., where ``labels_of`` reads two classes or more; else evenly
    spaced over the set. The first items alone can all be one class: an image folder's test split is sorted by
    class folder."""
    size = len(dataset)
    count = min(count, size)
    labels = labels_of(dataset)
    classes = labels.unique() if labels is not None else None
    if classes is None or len(classes) < 2:
        return [i * size // count for i in range(count)]
    members = [torch.nonzero(labels == c).flatten().tolist() for c in classes]
    turns = [items[rank] for rank in range(max(map(len, members))) for items in members if rank < len(items)]
    return turns[:count]


def slices(size: int, batch_size: int) -> list[tuple[int, int, int]]:
    """(global batch index, start, end) of this rank's slice of each batch of the test split: the batches of one
    process with ``ranks * batch_size``, each split into consecutive slices of ``batch_size``, as in training
    (``loader.BatchStream``). A slice of the last batch may be empty, and is left out; one process has whole batches."""
    ranks, rank = distributed.world_size(), distributed.rank()
    step = batch_size * ranks
    found = []
    for index, start in enumerate(range(0, size, step)):
        lo, hi = start + rank * batch_size, min(start + (rank + 1) * batch_size, start + step, size)
        if lo < hi:
            found.append((index, lo, hi))
    return found


@torch.no_grad()
def evaluate(model, dataset, batch_size: int, device, image_quality=None) -> tuple[dict, torch.Tensor]:
    """Metrics over the whole test split, and the code counts behind them.

    Both tasks: ``perplexity`` (2^H of code usage over the whole test set in float64, MQ-VAE §5.2),
    ``active_codes`` and ``gradient_gap`` (Δgap of Huh Eq. 14 / MQ-VAE §5.2 per test batch, with the
    training task loss, averaged over batches; see ``metrics.gradient_gap``); then the task's own
    (``tasks.Reconstruction``, ``tasks.Classification``), FID / IS / LPIPS with ``image_quality``. The task's
    metrics see the data set's own pixels: the images, and the outputs where they are images, are mapped from the
    network's ``range`` (``data.range``) back to [0, 1]; Δgap is the training loss's, in the range's units.

    Data-parallel (every rank must call it), each rank evaluates its slice of every batch of one process with the
    global batch (``slices``), and the sums are reduced, so the metrics are that process's. Δgap is a norm over a
    whole batch of a mean loss's gradient: with m_r of the batch's m items on rank r, Δgap = sqrt(Σ_r (m_r Δ_r)²) / m,
    Δ_r being rank r's Δgap of its slice.
    """
    counts = torch.zeros(model.quantizer.num_codes, dtype=torch.long, device=device)
    scores, gaps = model.task.scores(image_quality), {}
    parts = slices(len(dataset), batch_size)
    # A generator of its own: a DataLoader draws its base seed when iterated, and from torch's global generator it
    # would advance the training's random draws (Gumbel noise, LRU replacement), so eval_every would change training.
    loader = DataLoader(dataset, batch_sampler=[list(range(lo, hi)) for _, lo, hi in parts], generator=torch.Generator())
    with evaluating(model):  # Δgap's two decoder passes update nothing
        for (index, lo, hi), (x, y) in zip(parts, loader):
            batch = (x.to(device), y.to(device))
            out = model(batch[0])
            counts += out.quant.counts
            gaps[index] = (hi - lo, metric_fns.gradient_gap(model.decoder, lambda o, b=batch: model.task_loss(o, b),
                                                            out.z_e, out.quant.z_q).item())
            output = to_pixels(out.output, model.range) if model.task.outputs_images else out.output
            scores.update((to_pixels(batch[0], model.range), batch[1]), output)
    counts = distributed.sum_(counts).cpu()
    metrics = {"perplexity": metric_fns.perplexity(counts), "active_codes": metric_fns.active_codes(counts),
               "gradient_gap": _mean_gap(gaps, len(range(0, len(dataset), batch_size * distributed.world_size()))),
               **metric_fns.code_rate(counts, getattr(model.quantizer, "groups", 1))}
    metrics.update(scores.compute())
    return metrics, counts


def _mean_gap(gaps: dict, batches: int) -> float:
    """The mean over the test split's batches of Δgap, from this rank's {batch index: (items, Δgap of its slice)}."""
    if distributed.world_size() == 1:
        return sum(gap for _, gap in gaps.values()) / batches
    weighted = torch.zeros(batches, dtype=torch.float64)
    items = torch.zeros(batches, dtype=torch.float64)
    for index, (count, gap) in gaps.items():
        weighted[index], items[index] = (count * gap) ** 2, count
    distributed.sum_(weighted)
    distributed.sum_(items)
    return float((weighted.sqrt() / items).mean())


def final_metrics(model, dataset, batch_size: int, device, settings: EvalConfig) -> tuple[dict, torch.Tensor]:
    """The end-of-run evaluation: ``evaluate`` with FID / IS / LPIPS where the task's outputs are images (as
    ``settings`` say: ``image_quality: off`` leaves them ``None`` with that reason, not computed), and the papers'
    scale factors under ``scales`` (MQ-VAE reports MSE ×1e-3, LPIPS ×1e-1, Δgap ×1e-5; ``metrics.SCALES``)."""
    measured = measures_quality(model.task, settings)
    quality = make_image_quality(device, settings.download_weights) if measured else None
    metrics, counts = model.task.evaluate(model, dataset, batch_size, device, image_quality=quality)
    if model.task.outputs_images and not measured:
        # Null with a reason rather than absent, so that a sweep's table names why its cell is empty.
        for name in model.task.image_metrics:
            metrics[name], metrics[f"{name}_reason"] = None, f"eval.image_quality: {settings.image_quality}"
    metrics["scales"] = dict(metric_fns.SCALES)
    return metrics, counts


@torch.no_grad()
def encoder_sample(model, dataset, device, max_images: int = 256, max_vectors: int = 2000) -> torch.Tensor:
    """Encoder outputs of the first test images as (N, dim) vectors (for the codebook PCA picture)."""
    with evaluating(model):
        z_e = model.encoder(first_images(dataset, max_images).to(device))
    return to_vectors(z_e)[:max_vectors].float().cpu()


def latents_and_codes(model, dataset, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample of encoder outputs and the code vectors, (N, d) and (K, d), for the codebook picture: grouped
    latents give one sub-vector of width d per group."""
    with torch.no_grad():
        codes = model.quantizer.effective_codebook().detach().float().cpu()
        vectors = encoder_sample(model, dataset, device).reshape(-1, codes.shape[1])
    return vectors, codes


@torch.no_grad()
def reconstructions(model, dataset, count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` test images spread over the classes (``shown_indices``) and their reconstructions, on the CPU, as
    [0, 1] pixels whatever the network's ``range``."""
    x = torch.stack([dataset[i][0] for i in shown_indices(dataset, count)]).to(device)
    with evaluating(model):
        recon = to_pixels(model(x).output, model.range).clamp(0, 1)
    return to_pixels(x, model.range).cpu(), recon.cpu()


@torch.no_grad()
def predictions(model, dataset, count: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` test images spread over the classes (``shown_indices``) as [0, 1] pixels, the classes predicted for
    them and their true classes, on the CPU."""
    items = [dataset[i] for i in shown_indices(dataset, count)]
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([int(label) for _, label in items])
    with evaluating(model):
        predicted = model(images.to(device)).output.argmax(1).cpu()
    return to_pixels(images, model.range), predicted, labels
