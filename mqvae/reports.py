"""Pictures of a run: reconstructions or predictions, training curves, code usage; and report.md."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from .files import atomic_write, save_figure, write_text  # noqa: E402


def save_recon_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path, per_row: int = 16) -> None:
    """Test originals in the upper rows, their reconstructions in the rows below."""
    n = originals.shape[0] - originals.shape[0] % per_row or originals.shape[0]
    grid = make_grid(torch.cat([originals[:n], recons[:n]]), nrow=min(per_row, n), padding=1, pad_value=1.0)
    atomic_write(path, lambda f: save_image(grid, f, format="png"))


def save_curves(records: list[dict], path: Path, metric: str) -> None:
    """Training loss and perplexity per level against the step, and the test ``metric`` (the task's
    ``curve_key``) where evaluated: the records that hold it are the evaluations."""
    train = [r for r in records if metric not in r]
    tests = [r for r in records if metric in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in sorted({k for r in train for k in r if k.endswith(".loss")}):
        axes[0].plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r], label=key)
    for key in sorted({k for r in train for k in r if k.endswith(".perplexity")}):
        axes[1].plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r], label=key)
    if tests:
        axes[2].plot([r["step"] for r in tests], [r[metric] for r in tests], marker="o")
    for ax, title in zip(axes, ["training loss (Eq. 6)", "batch perplexity", f"test {metric}"]):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if ax.lines and title != f"test {metric}":
            ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def _pca_2d(points: torch.Tensor, fit_on: torch.Tensor) -> torch.Tensor:
    """Project ``points`` on the two leading principal axes of ``fit_on`` (float64 SVD)."""
    fit_on = fit_on.double()
    mean = fit_on.mean(0, keepdim=True)
    if fit_on.shape[1] < 2:  # one-dimensional codes: plot against zero
        return torch.cat([points.double() - mean, torch.zeros(points.shape[0], 1, dtype=torch.float64)], 1)
    _, _, vh = torch.linalg.svd(fit_on - mean, full_matrices=False)
    return (points.double() - mean) @ vh[:2].T


def save_codebook(counts: torch.Tensor, vectors: torch.Tensor, codes: torch.Tensor, path: Path) -> None:
    """Huh et al. Fig. 2: code usage over the test set (sorted, most used first) and a 2-D PCA of a sample of
    encoder outputs with the codebook in the same projection (fitted on both together), used codes filled,
    unused ones hollow. ``vectors`` and ``codes`` are (N, d) and (K, d) with the same d."""
    counts = counts.detach().cpu().long()
    vectors, codes = vectors.detach().cpu().float(), codes.detach().cpu().float()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ordered = counts.sort(descending=True).values
    total = max(int(counts.sum()), 1)
    axes[0].bar(range(len(ordered)), (ordered.double() / total).numpy(), width=1.0, color="tab:blue")
    axes[0].set_title(f"code usage over the test set ({int((counts > 0).sum())}/{len(counts)} codes used)")
    axes[0].set_xlabel("code (sorted by usage)")
    axes[0].set_ylabel("fraction of test vectors")
    both = torch.cat([vectors, codes])
    projected = _pca_2d(both, both)
    pv, pc = projected[: len(vectors)].numpy(), projected[len(vectors):].numpy()
    used = (counts > 0).numpy() if len(counts) == len(codes) else None
    axes[1].scatter(pv[:, 0], pv[:, 1], s=3, alpha=0.3, color="tab:gray", label=f"encoder outputs ({len(vectors)})")
    if used is None:
        axes[1].scatter(pc[:, 0], pc[:, 1], s=18, color="tab:red", label="codes")
    else:
        axes[1].scatter(pc[used, 0], pc[used, 1], s=18, color="tab:red", label="codes (used)")
        axes[1].scatter(pc[~used, 0], pc[~used, 1], s=18, facecolors="none", edgecolors="tab:red", label="codes (unused)")
    axes[1].set_title("PCA of encoder outputs and codebook")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def write_report(run_dir: Path, metrics: dict, pictures=("recon.png", "curves.png", "codebook.png"), title: str = "") -> None:
    """report.md: the final metrics as a table (null metrics with their reason) and links to the pictures."""
    run_dir = Path(run_dir)
    lines = [f"# {title or run_dir.name}", "", "| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        if key.endswith("_reason") or key == "scales":
            continue
        cell = _fmt(value)
        reason = metrics.get(f"{key}_reason")
        if value is None and reason:
            cell = f"n/a ({reason})"
        lines.append(f"| {key} | {cell} |")
    scales = metrics.get("scales")
    if scales:
        lines += ["", "The papers report " + ", ".join(f"{k} in units of {v:g}" for k, v in scales.items())
                  + " (metrics.json holds unscaled values)."]
    lines.append("")
    for name in pictures:
        if (run_dir / name).is_file():
            lines += [f"![{name}]({name})", ""]
    write_text(run_dir / "report.md", "\n".join(lines))


def save_prediction_grid(images: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, path: Path, per_row: int = 8) -> None:
    """Classification's counterpart of the reconstruction grid: test images titled 'predicted (true)'."""
    n = images.shape[0]
    rows = (n + per_row - 1) // per_row
    fig, axes = plt.subplots(rows, per_row, figsize=(per_row * 1.2, rows * 1.35), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            image = images[i].clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
            ok = int(predicted[i]) == int(labels[i])
            ax.set_title(f"{int(predicted[i])} ({int(labels[i])})", fontsize=8, color="black" if ok else "red")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
