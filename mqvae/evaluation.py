"""Test-set evaluation of a ``VQModel``: task metrics and code usage over the whole test split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .quantizer import batch_perplexity


@torch.no_grad()
def evaluate(model, dataset, batch_size: int, device) -> dict:
    """Reconstruction: ``test_mse``; classification: ``accuracy``, ``f1`` (macro), ``cross_entropy``.
    Both: ``perplexity`` (2^H of code usage over the whole test set, MQ-VAE §5.2) and ``active_codes``."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(model.quantizer.num_codes, dtype=torch.long, device=device)
    total, squared_error, nll, predictions, labels = 0, 0.0, 0.0, [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        out = model(x)
        counts += out.quant.counts
        total += x.shape[0]
        if model.task == "reconstruction":
            squared_error += F.mse_loss(out.output, x, reduction="sum").item()
        else:
            nll += F.cross_entropy(out.output, y, reduction="sum").item()
            predictions.append(out.output.argmax(1).cpu())
            labels.append(y.cpu())
    model.train(was_training)
    metrics = {"perplexity": float(batch_perplexity(counts)), "active_codes": int((counts > 0).sum())}
    if model.task == "reconstruction":
        metrics["test_mse"] = squared_error / (total * dataset[0][0].numel())
    else:
        predictions, labels = torch.cat(predictions), torch.cat(labels)
        metrics.update(accuracy=float((predictions == labels).float().mean()), f1=macro_f1(predictions, labels),
                       cross_entropy=nll / total)
    return metrics, counts.cpu()


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Unweighted mean over classes present in labels or predictions of 2PR/(P+R)."""
    scores = []
    for c in torch.unique(torch.cat([predictions, labels])):
        tp = ((predictions == c) & (labels == c)).sum().item()
        fp = ((predictions == c) & (labels != c)).sum().item()
        fn = ((predictions != c) & (labels == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


@torch.no_grad()
def reconstructions(model, dataset, count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` test images and their reconstructions, on the CPU."""
    was_training = model.training
    model.eval()
    x = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))]).to(device)
    recon = model(x).output.clamp(0, 1)
    model.train(was_training)
    return x.cpu(), recon.cpu()
