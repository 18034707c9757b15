"""One experiment from config to run folder: data, model, levels, training, evaluation, pictures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from mqvae.runtime import distributed
from mqvae.io.checkpoint import load_checkpoint
from mqvae.config import Config
from mqvae.data import Datasets, load_datasets
from mqvae.errors import UserError
from mqvae.evaluation.evaluate import final_metrics, first_images
from mqvae.config.feasibility import check_feasible
from mqvae.io.files import FolderLock, os_error, read_lines, remove_stale_temps, write_json, write_text
from mqvae.data.loader import BatchStream, place
from mqvae.method.models import build_model
from mqvae.runtime.perf import apply_perf, perf_quantizer_config, perf_warnings
from mqvae.nn.pixelcnn import GatedPixelCNN
from mqvae.method.prior import PriorModel, code_maps, load_source, source_sha256
from mqvae.io.provenance import provenance
from mqvae.evaluation.reports import curve_panels, curves_figure, implicit_ratio, save_figures, write_report
from mqvae.io.tracking import require_tensorboard

from .build import build_problems, config_warnings, derived_seed
from .engine import LevelEngine
from .graphs import IterationGraphs, make_graph_safe
from .library_warnings import LibraryWarnings
from .run_folder import check_folder, claim, config_sha256


def resolve_device(name: str) -> torch.device:
    """The configured device; a data-parallel rank's CUDA device is the one torchrun's LOCAL_RANK gave it."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was requested but torch sees no CUDA device; use device: auto or cpu")
    if not (name == "cuda" or (name == "auto" and torch.cuda.is_available())):
        return torch.device("cpu")
    return torch.device("cuda", distributed.local_rank()) if distributed.world_size() > 1 else torch.device("cuda")


def build_engine(cfg: Config, run_dir: Path) -> LevelEngine:
    device = resolve_device(cfg.device)
    if cfg.perf.cuda_graphs and device.type != "cuda":
        raise UserError("perf.cuda_graphs: true needs a CUDA device, and torch sees none (device: auto); a CUDA graph "
                        "replays GPU kernels (set it to false)")
    if cfg.perf.cuda_graphs and distributed.world_size() > 1:
        raise UserError("perf.cuda_graphs with data-parallel ranks: the gradient averaging is not captured; run "
                        "without perf.cuda_graphs")
    if cfg.logging.tensorboard:
        require_tensorboard()
    torch.manual_seed(cfg.seed)
    datasets = load_datasets(cfg.data.name, cfg.data.root, cfg.data.download, cfg.seed, cfg.data.image_size,
                             cfg.data.random_crop, cfg.data.range)
    check_feasible(cfg, datasets.channels, datasets.image_size, datasets.num_classes, device)
    # perf: CUDA-only speed switches (mqvae.runtime.perf); on the CPU they are documented no-ops.
    model_cfg = dataclasses.replace(cfg, quantizer=perf_quantizer_config(cfg.perf, cfg.quantizer, device))
    model = build_model(model_cfg, datasets.channels, datasets.num_classes, datasets.image_size).to(device)
    if cfg.prior.run:
        model, datasets = prior_model(cfg, model, datasets, device)
    if cfg.model.sync_batch_norm:
        if device.type != "cuda":
            raise UserError("model.sync_batch_norm: torch's SyncBatchNorm runs on CUDA only; on the CPU each rank's "
                            "BatchNorm uses its own batch's statistics (set it to false)")
        if distributed.world_size() > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    perf_applied = apply_perf(cfg.perf, model, device)
    # data.on_device: measured once the model is on the device, so that its free memory is what the training has.
    datasets = dataclasses.replace(datasets, train=place(datasets.train, cfg.data.on_device, device, cfg.data.name))
    problems, dependencies = build_problems(cfg, model, datasets, device)
    engine = LevelEngine(cfg, problems, dependencies, model, datasets, device, run_dir)
    engine.perf_applied = perf_applied
    if cfg.perf.cuda_graphs:
        make_graph_safe(engine)
        engine.graphs = IterationGraphs(engine)
    for message in [*config_warnings(cfg), *perf_warnings(cfg.perf, device)]:
        engine.warn(message)
    return engine


def prior_model(cfg: Config, source, datasets: Datasets, device) -> tuple[PriorModel, Datasets]:
    """The model and data of a prior run: ``source`` (the run's network, built from its config) with the run's
    trained parameters, frozen, and a new PixelCNN; the data sets are the code maps (and labels) of the run's
    images, computed once with the frozen encoder."""
    if cfg.prior.class_conditional and datasets.num_classes < 2:
        raise UserError(f"prior.class_conditional: data set {cfg.data.name} has no class labels; set it to false")
    load_source(cfg, source)
    train, test = (code_maps(source, split, cfg.data.batch_size, device) for split in (datasets.train, datasets.test))
    num_classes = datasets.num_classes if cfg.prior.class_conditional else 0
    pixelcnn = GatedPixelCNN(cfg.quantizer.num_codes, cfg.prior.channels, cfg.prior.layers, cfg.prior.kernel, num_classes)
    model = PriorModel(source, pixelcnn.to(device), tuple(train.tensors[0].shape[1:]), datasets.test, cfg.seed,
                       source_sha256(cfg.prior.run))
    return model, dataclasses.replace(datasets, train=train, test=test)


def initialize_codebook(engine: LevelEngine) -> None:
    """k-means initialization from the encoder outputs of the first 2048 training images (Huh et al., §3;
    MQ-VAE §5.1: "All models were initialized using the K-means clustering algorithm"), after
    ``quantizer.kmeans_warmup`` steps of the encoder-decoder without its quantizer (``warm_up_encoder_decoder``).

    The fit and the warm-up draw from generators seeded by the run's seed alone and train the encoder and decoder
    only, so every method at one seed that shares the network starts from the same encoder, decoder and codebook."""
    model = engine.model
    warm_up_encoder_decoder(engine)  # on every rank, so that each holds the optimizer state the broadcast fills
    if engine.writes:  # data-parallel: rank 0 computes the codes on the same images, and every rank takes them
        with torch.no_grad():
            z_e = model.encoder(first_images(engine.datasets.train, 2048).to(engine.device))
        model.quantizer.initialize(z_e, generator=torch.Generator(engine.device).manual_seed(engine.cfg.seed))
    optimizer_state = [value for problem in engine.problems for group in problem.optimizer.param_groups
                       for param in group["params"] for value in problem.optimizer.state.get(param, {}).values()
                       if torch.is_tensor(value)]
    distributed.broadcast_([*model.parameters(), *model.buffers(), *optimizer_state])


def warm_up_encoder_decoder(engine: LevelEngine) -> None:
    """``quantizer.kmeans_warmup`` optimizer steps of the encoder and decoder on the task loss with z_q = z_e.

    Why: the untrained encoder's outputs form a cloud far smaller than one Adam step moves it. On digits the cloud's
    spread (the norm of the per-dimension standard deviations) is 0.043 and the first step moves its mean by 0.11,
    so a codebook fitted there is left behind at once: 128 codes in use at the fit, 23 after one step and 2 after
    four, in every method. A fresh Adam's first steps are that large whenever they come (about lr per weight,
    whatever the gradient's size), so the warm-up takes them with the training's own optimizers: each level's
    optimizer steps the encoder and decoder parameters it holds, and keeps its moment estimates for the training.
    The codes and the other levels' parameters get no gradient, so their optimizers leave them alone (docs/design.md,
    "k-means after a warm-up"). The lr schedules do not advance. The batches come from their own stream, so the
    training's batches are those of a run without warm-up."""
    steps = engine.cfg.quantizer.kmeans_warmup
    if not steps:
        return
    cfg, model, device = engine.cfg, engine.model, engine.device
    # Data-parallel: every rank takes the global batch, as one process with ranks x data.batch_size would.
    batch_size = cfg.data.batch_size * distributed.world_size()
    stream = BatchStream(engine.datasets.train, batch_size, seed=derived_seed(cfg.seed, "kmeans_warmup"),
                         num_workers=cfg.data.num_workers, device=device)
    model.train()
    taken = 0
    while taken < steps:
        for batch in stream:
            model.zero_grad(set_to_none=True)
            model.task_loss(model.decoder(model.encoder(batch[0])), batch).backward()
            for problem in engine.problems:
                problem.optimizer.step()  # torch's optimizers skip a parameter whose gradient is None
            taken += 1
            if taken == steps:
                break
    model.zero_grad(set_to_none=True)


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from (and a line torn by a kill), so the log
    reads as one run."""
    if path.exists():
        records = [record for record in read_lines(path) if record["step"] <= step]
        write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def _before_first_checkpoint(run_dir: Path) -> bool:
    """A started run (config.yaml written) with neither a checkpoint nor a finished result."""
    finished_or_saved = any((run_dir / name).exists() for name in ("checkpoint.pt", "metrics.json"))
    return (run_dir / "config.yaml").is_file() and not finished_or_saved


def run_experiment(cfg: Config, run_dir: Path, resume: bool = False, overwrite: bool = False) -> dict:
    """Train ``cfg`` into ``run_dir`` and evaluate it. A new run needs a folder that holds no other run (or
    ``overwrite``); ``resume`` continues from the folder's checkpoint. The folder is locked meanwhile."""
    run_dir = Path(run_dir)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    distributed.start(cfg.distributed.backend, cfg.distributed.timeout_s, cfg.device)
    if distributed.rank() != 0:
        return _other_rank(cfg, run_dir, resume)
    check_folder(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(run_dir, exc) from None
    # Libraries' warnings from here to the final evaluation go to log.jsonl, not the terminal.
    with FolderLock(run_dir), LibraryWarnings() as library_warnings:
        remove_stale_temps(run_dir)
        if resume and _before_first_checkpoint(run_dir):
            # Stopped before its first checkpoint: nothing trained survives, so the run starts again from
            # iteration 0 (same seed, same config), which is what an uninterrupted run did.
            print(f"{run_dir}: no checkpoint yet; starting the run from iteration 0", flush=True)
            resume = False
            overwrite = True
        checkpoint = load_checkpoint(run_dir / "checkpoint.pt") if resume else None
        if checkpoint is not None and cfg.train.iters < checkpoint["step"]:
            # Training cannot go back: the folder would then hold a config of fewer iterations than its checkpoint
            # and metrics.json.
            raise UserError(f"--resume: train.iters={cfg.train.iters} is below the {checkpoint['step']} iterations "
                            f"{run_dir / 'checkpoint.pt'} has trained; resume with train.iters of at least "
                            f"{checkpoint['step']} (nothing was changed)")
        _share_decision(resume)
        engine = build_engine(cfg, run_dir)
        library_warnings.attach(engine)
        if checkpoint is not None:
            engine.load_state_dict(checkpoint, str(run_dir / "checkpoint.pt"))
            _trim_log(run_dir / "log.jsonl", engine.global_step)
        else:
            # Only now, with data and model built, does the new run take the folder over: config.yaml first, so
            # that any later kill leaves a folder that --resume recognises.
            claim(run_dir, overwrite)
            engine.write_config()
            write_text(run_dir / "log.jsonl", "")
            if cfg.quantizer.kmeans_init and not cfg.prior.run:  # a prior's codebook is its source run's
                initialize_codebook(engine)
        try:
            engine.run()
            engine.save()
            return finish(engine)
        finally:
            engine.close()


def _share_decision(resume: bool) -> bool:
    """Data-parallel: rank 0's answer to "continue from the checkpoint?", which every rank follows."""
    flag = torch.tensor([int(resume)])
    distributed.broadcast_([flag])
    return bool(flag.item())


def _other_rank(cfg: Config, run_dir: Path, resume: bool) -> dict:
    """A data-parallel rank other than 0: it trains and evaluates its share in step with rank 0 and writes nothing;
    rank 0 holds the run folder and writes the results."""
    resume = _share_decision(resume)
    engine = build_engine(cfg, run_dir)
    if resume:
        engine.load_state_dict(load_checkpoint(run_dir / "checkpoint.pt"), str(run_dir / "checkpoint.pt"))
    elif cfg.quantizer.kmeans_init and not cfg.prior.run:
        initialize_codebook(engine)
    engine.run()
    engine.save()
    final_metrics(engine.model, engine.datasets.test, cfg.data.batch_size, engine.device, cfg.eval)  # its shard
    return {}


def finish(engine: LevelEngine) -> dict:
    """Evaluate on the whole test split (with FID / IS / LPIPS where the outputs are images, as ``eval`` says) and
    write metrics.json, the pictures (recon.png: the task's picture, curves.png, codebook.png; recon and codebook
    also to TensorBoard) and report.md."""
    cfg, run_dir, model = engine.cfg, engine.run_dir, engine.model
    metrics, counts = final_metrics(model, engine.datasets.test, cfg.data.batch_size, engine.device, cfg.eval)
    records = read_lines(run_dir / "log.jsonl")
    metrics.update(iterations=engine.global_step, wall_time_s=round(engine.train_time, 3),
                   config_sha256=config_sha256(cfg), **implicit_ratio(records),
                   provenance=provenance(engine.device))  # (of the process that finished a resumed run)
    pictures = engine.pictures(metrics, counts)
    engine.track_pictures(pictures)
    # The scalars a level learns (e.g. a learned beta) get a panel each, called learned where the level's
    # parameters reach them (Level.learned; where no step has shown it since a checkpoint written before it was
    # kept, the level's declaration stands); the batch perplexity is the one of the level whose forward is the
    # real training forward (the others run the same quantizer on other parameters or batches).
    learned = {f"{p.name}.{key}": p.learned is None or key in p.learned for p in engine.problems
               for key in p.learned_scalars}
    perplexity = f"{engine.encoder_level.name}.perplexity" if engine.encoder_level is not None else None
    panels = curve_panels(records, model.task, learned, perplexity)
    save_figures({**pictures, "curves": curves_figure(panels)}, run_dir)
    write_report(run_dir, metrics, title=str(run_dir))
    # metrics.json last: its presence marks a finished run (sweeps skip such runs when restarted).
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def write_diverged(run_dir: Path, reason: str) -> None:
    """metrics.json of a run whose loss diverged: no metric was measured, and ``diverged`` says where it
    stopped. The file marks the run as finished, so a restarted sweep does not train it again."""
    write_json(run_dir / "metrics.json", {"diverged": reason})

