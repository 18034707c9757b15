"""Pictures of a run: reconstructions and training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402


def save_recon_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path, per_row: int = 16) -> None:
    """Test originals in the upper rows, their reconstructions in the rows below."""
    n = originals.shape[0] - originals.shape[0] % per_row or originals.shape[0]
    grid = make_grid(torch.cat([originals[:n], recons[:n]]), nrow=min(per_row, n), padding=1, pad_value=1.0)
    save_image(grid, path)


def save_curves(records: list[dict], path: Path) -> None:
    """Training loss and perplexity per level against the step, and test metrics where evaluated."""
    train = [r for r in records if "test_mse" not in r and "accuracy" not in r]
    tests = [r for r in records if "test_mse" in r or "accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in sorted({k for r in train for k in r if k.endswith(".loss")}):
        axes[0].plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r], label=key)
    for key in sorted({k for r in train for k in r if k.endswith(".perplexity")}):
        axes[1].plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r], label=key)
    metric = "test_mse" if any("test_mse" in r for r in tests) else "accuracy"
    if tests:
        axes[2].plot([r["step"] for r in tests], [r[metric] for r in tests], marker="o")
    for ax, title in zip(axes, ["training loss (Eq. 6)", "batch perplexity", f"test {metric}"]):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if ax.lines and title != f"test {metric}":
            ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
