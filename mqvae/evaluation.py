"""Test-set evaluation of a ``VQModel``: task metrics, code usage, the gradient gap and image quality.

``evaluate`` runs at every ``train.eval_every`` and at the end of a run; the image-quality metrics
(FID / IS / LPIPS, MQ-VAE Table 3) need pretrained networks and a pass over the whole test set, so they
are computed only when an ``ImageQuality`` is passed in, which ``final_metrics`` does once per run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import metrics as metric_fns


def make_image_quality(device):
    """The FID / IS / LPIPS accumulator of a run's final evaluation.

    A module-level function so that tests (and users with their own feature networks) can swap in
    stand-in networks: ``ImageQuality(device, fid_feature=..., is_feature=..., lpips_net=...)``.
    Missing pretrained weights, and for LPIPS images too small for AlexNet (under ``metrics.LPIPS_MIN_SIDE``:
    28-px MNIST, 16-px digits), give ``None`` with a reason, never a number (``metrics.ImageQuality``).
    """
    return metric_fns.ImageQuality(device)


@torch.no_grad()
def evaluate(model, dataset, batch_size: int, device, image_quality=None) -> tuple[dict, torch.Tensor]:
    """Metrics over the whole test split, and the code counts behind them.

    Both tasks: ``perplexity`` (2^H of code usage over the whole test set in float64, MQ-VAE §5.2),
    ``active_codes`` and ``gradient_gap`` (Δgap of Huh Eq. 14 / MQ-VAE §5.2 per test batch, with the
    training task loss, averaged over batches; see ``metrics.gradient_gap``).
    Reconstruction: ``test_mse`` (per pixel); with ``image_quality``: ``fid``, ``is``, ``lpips`` and
    their ``*_reason``. Classification: ``accuracy``, ``f1`` (macro), ``cross_entropy`` (mean per image).
    """
    was_training = model.training
    model.eval()  # BatchNorm uses running statistics; Δgap's two decoder passes update nothing
    counts = torch.zeros(model.quantizer.num_codes, dtype=torch.long, device=device)
    total, squared_error, nll, predictions, labels, gaps = 0, 0.0, 0.0, [], [], []
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x, y = x.to(device), y.to(device)
            out = model(x)
            counts += out.quant.counts
            total += x.shape[0]
            batch = (x, y)
            gaps.append(metric_fns.gradient_gap(model.decoder, lambda o, b=batch: model.task_loss(o, b),
                                                out.z_e, out.quant.z_q).item())
            if model.task == "reconstruction":
                squared_error += F.mse_loss(out.output, x, reduction="sum").item()
                if image_quality is not None:
                    image_quality.update(x, out.output)
            else:
                nll += F.cross_entropy(out.output, y, reduction="sum").item()
                predictions.append(out.output.argmax(1).cpu())
                labels.append(y.cpu())
    finally:
        model.train(was_training)
    counts = counts.cpu()
    metrics = {"perplexity": metric_fns.perplexity(counts), "active_codes": metric_fns.active_codes(counts),
               "gradient_gap": sum(gaps) / len(gaps)}
    if model.task == "reconstruction":
        metrics["test_mse"] = squared_error / (total * dataset[0][0].numel())
        if image_quality is not None:
            metrics.update(image_quality.compute())
    else:
        predictions, labels = torch.cat(predictions), torch.cat(labels)
        metrics.update(accuracy=float((predictions == labels).float().mean()), f1=macro_f1(predictions, labels),
                       cross_entropy=nll / total)
    return metrics, counts


def final_metrics(model, dataset, batch_size: int, device) -> tuple[dict, torch.Tensor]:
    """The end-of-run evaluation: ``evaluate`` with FID / IS / LPIPS for reconstruction, and the papers'
    scale factors under ``scales`` (MQ-VAE reports MSE ×1e-3, LPIPS ×1e-1, Δgap ×1e-5; ``metrics.SCALES``)."""
    quality = make_image_quality(device) if model.task == "reconstruction" else None
    metrics, counts = evaluate(model, dataset, batch_size, device, image_quality=quality)
    metrics["scales"] = dict(metric_fns.SCALES)
    return metrics, counts


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Unweighted mean over classes present in labels or predictions of 2PR/(P+R)
    (sklearn's ``f1_score(average="macro")``)."""
    scores = []
    for c in torch.unique(torch.cat([predictions, labels])):
        tp = ((predictions == c) & (labels == c)).sum().item()
        fp = ((predictions == c) & (labels != c)).sum().item()
        fn = ((predictions != c) & (labels == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


@torch.no_grad()
def encoder_sample(model, dataset, device, max_images: int = 256, max_vectors: int = 2000) -> torch.Tensor:
    """Encoder outputs of the first test images as (N, dim) vectors (for the codebook PCA picture)."""
    from .quantizer import to_vectors

    was_training = model.training
    model.eval()
    x = torch.stack([dataset[i][0] for i in range(min(max_images, len(dataset)))]).to(device)
    z_e = model.encoder(x)
    model.train(was_training)
    vectors = to_vectors(z_e) if z_e.ndim == 4 else z_e.reshape(z_e.shape[0], -1)
    return vectors[:max_vectors].float().cpu()


@torch.no_grad()
def reconstructions(model, dataset, count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` test images and their reconstructions, on the CPU."""
    was_training = model.training
    model.eval()
    x = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))]).to(device)
    recon = model(x).output.clamp(0, 1)
    model.train(was_training)
    return x.cpu(), recon.cpu()
