"""One experiment from config to run folder: data, model, levels, training, evaluation, pictures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml

from mqvae.checkpoint import load_checkpoint
from mqvae.config import Config, to_dict
from mqvae.data import load_datasets
from mqvae.errors import UserError
from mqvae.evaluation import evaluate, reconstructions
from mqvae.models import build_model
from mqvae.reports import save_curves, save_recon_grid

from .build import build_problems
from .engine import LevelEngine

RUN_FILES = ("config.yaml", "log.jsonl", "checkpoint.pt", "metrics.json", "recon.png", "curves.png")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was requested but torch sees no CUDA device; use device: auto or cpu")
    return torch.device(name)


def build_engine(cfg: Config, run_dir: Path) -> LevelEngine:
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.perf.cudnn_benchmark
    torch.manual_seed(cfg.seed)
    datasets = load_datasets(cfg.data.name, cfg.data.root, cfg.data.download, cfg.seed)
    model = build_model(cfg, datasets.channels, datasets.num_classes).to(device)
    problems, dependencies = build_problems(cfg, model, datasets, device)
    return LevelEngine(cfg, problems, dependencies, model, datasets, device, run_dir)


def _initialize_codebook(engine: LevelEngine) -> None:
    """k-means initialization from encoder outputs of a few training batches (Huh et al., §3)."""
    model, stream = engine.model, engine.encoder_level.stream
    xs = [x for x, _ in (engine.datasets.train[i] for i in range(min(len(engine.datasets.train), 2048)))]
    with torch.no_grad():
        z_e = model.encoder(torch.stack(xs).to(engine.device))
    model.quantizer.initialize(z_e)


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from, so the log reads as one run."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def run_experiment(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt") if resume else None
    run_dir.mkdir(parents=True, exist_ok=True)
    engine = build_engine(cfg, run_dir)
    if checkpoint is not None:
        engine.load_state_dict(checkpoint, str(run_dir / "checkpoint.pt"))
        _trim_log(run_dir / "log.jsonl", engine.global_step)
    else:
        (run_dir / "log.jsonl").write_text("")
        if cfg.quantizer.kmeans_init:
            _initialize_codebook(engine)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    started = time.perf_counter()
    engine.run()
    engine.save()
    return finish(engine, time.perf_counter() - started)


def finish(engine: LevelEngine, _elapsed: float) -> dict:
    """Evaluate on the whole test split and write metrics.json and the pictures."""
    cfg, run_dir = engine.cfg, engine.run_dir
    metrics, _counts = evaluate(engine.model, engine.datasets.test, cfg.data.batch_size, engine.device)
    metrics.update(iterations=engine.global_step, wall_time_s=round(engine.train_time, 3))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if engine.model.task == "reconstruction":
        originals, recons = reconstructions(engine.model, engine.datasets.test, 32, engine.device)
        save_recon_grid(originals, recons, run_dir / "recon.png")
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line]
    save_curves(records, run_dir / "curves.png")
    return metrics
