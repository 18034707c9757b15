"""Pictures of a run: reconstructions or predictions, training curves, code usage; and report.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from mqvae.io.files import save_figure, write_text

# Figures are made with matplotlib.figure.Figure, not pyplot: nothing keeps them alive after their last use, so no
# caller has to close them, and no display backend is involved on training machines.

# recon.png: each image at least this many pixels on a side (digits are 16 px), upscaled by nearest neighbour.
MIN_CELL_PX = 64
# The band above recon.png's and samples.png's images that holds the title, in pixels.
TITLE_PX = 30


def _figure(**kwargs):
    """A matplotlib Figure. matplotlib is imported here, on the first picture, not when a run starts (a config's
    typo should not wait for it)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def recon_figure(originals: torch.Tensor, recons: torch.Tensor, title: str, per_row: int = 16) -> Figure:
    """Test inputs in labelled rows, each directly above its reconstruction, upscaled by an integer factor
    (nearest neighbour, so pixels stay pixels) to at least MIN_CELL_PX per image, under ``title``."""
    n = originals.shape[0] - originals.shape[0] % per_row or originals.shape[0]
    columns, rows = min(per_row, n), math.ceil(n / per_row)
    pictures = [t[:n].detach().float().clamp(0, 1).cpu() for t in (originals, recons)]
    channels, height, width = pictures[0].shape[1:]
    scale = max(1, math.ceil(MIN_CELL_PX / min(height, width)))
    cell_h, cell_w, gap, pair_gap = height * scale, width * scale, 2, 14
    canvas = np.ones((rows * (2 * cell_h + gap + pair_gap) - pair_gap, columns * (cell_w + gap) - gap, channels))
    for i in range(n):
        row, column = divmod(i, per_row)
        top, left = row * (2 * cell_h + gap + pair_gap), column * (cell_w + gap)
        for j, picture in enumerate(pictures):  # the input, then its reconstruction below it
            y = top + j * (cell_h + gap)
            upscaled = picture[i].permute(1, 2, 0).numpy().repeat(scale, 0).repeat(scale, 1)
            canvas[y: y + cell_h, left: left + cell_w] = upscaled
    dpi, label_w = 100, 130
    total_w, total_h = label_w + canvas.shape[1], TITLE_PX + canvas.shape[0]
    fig = _figure(figsize=(total_w / dpi, total_h / dpi), dpi=dpi)
    ax = fig.add_axes((label_w / total_w, 0, canvas.shape[1] / total_w, canvas.shape[0] / total_h))
    ax.imshow(canvas[..., 0] if channels == 1 else canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest",
              aspect="auto")
    ax.axis("off")
    for row in range(rows):
        for j, label in enumerate(("input", "reconstruction")):
            center = row * (2 * cell_h + gap + pair_gap) + j * (cell_h + gap) + cell_h / 2
            fig.text((label_w - 8) / total_w, (canvas.shape[0] - center) / total_h, label, ha="right", va="center",
                     fontsize=11)
    fig.suptitle(title, y=1 - TITLE_PX / 2 / total_h, va="center", fontsize=11)
    return fig


def samples_figure(images: torch.Tensor, title: str, per_row: int = 8) -> Figure:
    """A grid of generated images (samples.png), upscaled by an integer factor (nearest neighbour) to at least
    MIN_CELL_PX per image, under ``title``."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, (channels, height, width) = images.shape[0], images.shape[1:]
    columns, rows = min(per_row, n), math.ceil(n / per_row)
    scale = max(1, math.ceil(MIN_CELL_PX / min(height, width)))
    cell_h, cell_w, gap = height * scale, width * scale, 2
    canvas = np.ones((rows * (cell_h + gap) - gap, columns * (cell_w + gap) - gap, channels))
    for i in range(n):
        row, column = divmod(i, per_row)
        top, left = row * (cell_h + gap), column * (cell_w + gap)
        canvas[top: top + cell_h, left: left + cell_w] = images[i].permute(1, 2, 0).numpy().repeat(scale, 0).repeat(scale, 1)
    dpi, total_h = 100, TITLE_PX + canvas.shape[0]
    fig = _figure(figsize=(canvas.shape[1] / dpi, total_h / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, canvas.shape[0] / total_h))
    ax.imshow(canvas[..., 0] if channels == 1 else canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest",
              aspect="auto")
    ax.axis("off")
    fig.suptitle(title, y=1 - TITLE_PX / 2 / total_h, va="center", fontsize=9)
    return fig


@dataclass
class Panel:
    """One panel of curves.png: lines by label, as (steps, values), or a note saying why there are none."""

    title: str
    lines: dict[str, tuple[list, list]] = field(default_factory=dict)
    note: str = ""
    log_scale: bool = False
    marker: str = ""
    ylabel: str = ""


def _series(records: list[dict], key: str) -> tuple[list, list]:
    return [r["step"] for r in records if key in r], [r[key] for r in records if key in r]


def curve_panels(records: list[dict], task, learned_scalars: dict[str, bool] | None = None,
                 perplexity: str | None = None) -> list[Panel]:
    """The panels of curves.png from log.jsonl's records: every level's training loss; the batch perplexity of
    ``perplexity`` (the level whose forward is the real training forward; every level runs the same quantizer,
    so one line says it); one panel per level's learned scalar (``<level>.<term>`` keys, e.g. a learned beta,
    each with whether its level's parameters reach it: only then is it titled learned); and the ``task``'s test
    metric (its ``curve_key``; the records that hold it are the evaluations)."""
    metric = task.curve_key
    train = [r for r in records if metric not in r]
    tests = [r for r in records if metric in r]
    losses = {key: _series(train, key) for key in sorted({k for r in train for k in r if k.endswith(".loss")})}
    positive = all(v > 0 for _, values in losses.values() for v in values)
    panels = [Panel("training loss per level", losses, "" if losses else "nothing logged", log_scale=positive,
                    ylabel="loss (each level's)")]
    if perplexity is not None:
        line = _series(train, perplexity)
        panels.append(Panel(f"batch perplexity ({perplexity})", {perplexity: line} if line[0] else {},
                            "" if line[0] else f"{perplexity} not logged", ylabel="perplexity (2^H of the batch's codes)"))
    for key, learned in (learned_scalars or {}).items():
        line = _series(train, key)
        panels.append(Panel(f"learned {key}" if learned else f"{key} (not learned)", {key: line} if line[0] else {},
                            "" if line[0] else f"{key} not logged", ylabel=key.split(".")[-1]))
    panels.extend(hypergradient_panels(train))
    panels.append(Panel(task.curve_title, {metric: _series(tests, metric)} if tests else {},
                        "" if tests else "no evaluation during training", marker="o", ylabel=metric))
    # Code usage on the test split at each evaluation: a codebook that collapses shows here first.
    usage = {key: _series(tests, key) for key in ("perplexity", "active_codes") if any(key in r for r in tests)}
    if usage:
        panels.append(Panel("test code usage", usage, marker="o", ylabel="codes (perplexity: 2^H)"))
    for key, title in task.extra_curves:
        # Where it was not measured, the reason is in log.jsonl and metrics.json (too long for a panel).
        measured = [r for r in tests if r.get(key) is not None]
        panels.append(Panel(title, {key: _series(measured, key)} if measured else {},
                            "" if measured else f"{key} not measured (see metrics.json)", marker="o", ylabel=key))
    return panels


def _levels_with(records: list[dict], key: str) -> list[str]:
    return sorted({k[: -len(key) - 1] for r in records for k in r if k.endswith(f".{key}")})


def hypergradient_panels(records: list[dict]) -> list[Panel]:
    """MQ-VAE Fig. 6 from the training records: the norms of each upper level's direct and implicit terms, and
    their cosine similarity. None for a run that took no hypergradient."""
    levels = _levels_with(records, "implicit_norm")
    if not levels:
        return []
    norms = {f"{level}.{key}": _series(records, f"{level}.{key}") for level in levels
             for key in ("direct_norm", "implicit_norm")}
    positive = all(v > 0 for _, values in norms.values() for v in values)
    cosines = {f"{level}.cosine": _series(records, f"{level}.cosine") for level in levels}
    return [Panel("hypergradient terms' norms (Fig. 6)", norms, log_scale=positive, ylabel="L2 norm"),
            Panel("cosine(direct, implicit) (Fig. 6)", cosines, ylabel="cosine similarity")]


def implicit_ratio(records: list[dict]) -> dict:
    """metrics.json's ``implicit_ratio``: ||implicit|| / ||direct|| (Fig. 6) averaged over the logged training
    steps, for a run with one level that takes a hypergradient; null with the reason otherwise."""
    levels = _levels_with(records, "implicit_ratio")
    if len(levels) != 1:
        reason = ("no level took a hypergradient (one level, or xi = 0)" if not levels else
                  f"{len(levels)} levels took a hypergradient; see their <level>.implicit_ratio in log.jsonl")
        return {"implicit_ratio": None, "implicit_ratio_reason": reason}
    _, values = _series(records, f"{levels[0]}.implicit_ratio")
    return {"implicit_ratio": sum(values) / len(values)}


def curves_figure(panels: list[Panel]) -> Figure:
    fig = _figure(figsize=(4.3 * len(panels), 3.6), dpi=110)
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for label, (steps, values) in panel.lines.items():
            # A line of one point (a run logged once) is invisible without a marker.
            ax.plot(steps, values, label=label, marker=panel.marker or ("o" if len(steps) == 1 else None))
        ax.set_title(panel.title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(panel.ylabel)
        if panel.note:
            ax.text(0.5, 0.5, panel.note, ha="center", va="center", transform=ax.transAxes, color="gray")
        if panel.log_scale:
            ax.set_yscale("log")
        if len(panel.lines) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _pca_2d(points: torch.Tensor, fit_on: torch.Tensor) -> torch.Tensor:
    """Project ``points`` on the two leading principal axes of ``fit_on`` (float64 SVD)."""
    fit_on = fit_on.double()
    mean = fit_on.mean(0, keepdim=True)
    if fit_on.shape[1] < 2:  # one-dimensional codes: plot against zero
        return torch.cat([points.double() - mean, torch.zeros(points.shape[0], 1, dtype=torch.float64)], 1)
    _, _, vh = torch.linalg.svd(fit_on - mean, full_matrices=False)
    return (points.double() - mean) @ vh[:2].T


def codebook_figure(counts: torch.Tensor, vectors: torch.Tensor, codes: torch.Tensor) -> Figure:
    """Huh et al. Fig. 2: code usage over the test set (sorted, most used first) and a 2-D PCA of a sample of
    encoder outputs with the codebook in the same projection (fitted on both together), used codes filled red on
    top, unused ones hollow blue below them, each counted in the legend. ``vectors`` and ``codes`` are (N, d) and
    (K, d) with the same d."""
    counts = counts.detach().cpu().long()
    vectors, codes = vectors.detach().cpu().float(), codes.detach().cpu().float()
    fig = _figure(figsize=(11, 4), dpi=110)
    axes = fig.subplots(1, 2)
    ordered = counts.sort(descending=True).values
    total = max(int(counts.sum()), 1)
    # Red as the used codes in the projection: a bar is a used code.
    axes[0].bar(range(len(ordered)), (ordered.double() / total).numpy(), width=1.0, color="tab:red")
    used_of = f"{int((counts > 0).sum())} of {len(counts)} codes used"
    axes[0].set_title(f"code usage over the test set ({used_of})")
    axes[0].set_xlabel("code (sorted by usage)")
    axes[0].set_ylabel("fraction of test vectors")
    both = torch.cat([vectors, codes])
    projected = _pca_2d(both, both)
    pv, pc = projected[: len(vectors)].numpy(), projected[len(vectors):].numpy()
    used = (counts > 0).numpy() if len(counts) == len(codes) else None
    axes[1].scatter(pv[:, 0], pv[:, 1], s=3, alpha=0.3, color="tab:gray", label=f"encoder outputs ({len(vectors)})")
    if used is None:
        axes[1].scatter(pc[:, 0], pc[:, 1], s=18, color="tab:red", label=f"codes ({len(codes)})")
        axes[1].set_title("PCA of encoder outputs and codebook")
    else:
        # Used codes on top of unused ones: after a collapse the few used codes sit among many unused ones and
        # would vanish under them. Unused in another colour, as a hollow red marker hides a filled red one.
        axes[1].scatter(pc[~used, 0], pc[~used, 1], s=18, facecolors="none", edgecolors="tab:blue", linewidths=0.8,
                        zorder=2, label=f"unused codes ({int((~used).sum())})")
        axes[1].scatter(pc[used, 0], pc[used, 1], s=18, color="tab:red", zorder=3,
                        label=f"used codes ({int(used.sum())})")
        axes[1].set_title(f"PCA of encoder outputs and codebook ({used_of})")
    axes[1].set_xlabel("principal component 1")
    axes[1].set_ylabel("principal component 2")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def write_report(run_dir: Path, metrics: dict, pictures=("recon.png", "samples.png", "curves.png", "codebook.png"), title: str = "") -> None:
    """report.md: the final metrics as a table (null metrics with their reason) and links to the pictures."""
    run_dir = Path(run_dir)
    lines = [f"# {title or run_dir.name}", "", "| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        if key.endswith("_reason") or key in ("scales", "provenance"):
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
    provenance = metrics.get("provenance")
    if provenance:
        lines += ["", "Made by: " + ", ".join(f"{k} {v}" for k, v in provenance.items()) + "."]
    lines.append("")
    for name in pictures:
        if (run_dir / name).is_file():
            lines += [f"![{name}]({name})", ""]
    write_text(run_dir / "report.md", "\n".join(lines))


def prediction_figure(images: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, title: str,
                      per_row: int = 8) -> Figure:
    """Classification's counterpart of the reconstruction grid: test images titled 'predicted (true)', wrong
    predictions in red, under ``title``."""
    n = images.shape[0]
    rows = (n + per_row - 1) // per_row
    fig = _figure(figsize=(per_row * 1.2, rows * 1.35), dpi=100)
    axes = fig.subplots(rows, per_row, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            image = images[i].clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
            ok = int(predicted[i]) == int(labels[i])
            ax.set_title(f"{int(predicted[i])} ({int(labels[i])})", fontsize=8, color="black" if ok else "red")
    fig.suptitle(f"{title}\npredicted (true)", fontsize=9)
    fig.tight_layout()
    return fig


def save_figures(figures: dict, run_dir: Path) -> None:
    """Each figure (name -> Figure) as run_dir/<name>.png, at the figure's own resolution."""
    for name, figure in figures.items():
        save_figure(figure, Path(run_dir) / f"{name}.png")
