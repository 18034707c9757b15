"""The Betty Engine that runs any level graph: one level (VQ-VAE), two (MQ-VAE) or more."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch
from betty.configs import EngineConfig
from betty.engine import Engine
from betty.logging.logger_base import get_logger
from tqdm import tqdm

from mqvae.runtime import distributed
from mqvae.io.checkpoint import (check_hyperparameters, keep_run_settings, non_finite_entries, rng_state, save_checkpoint,
                                 set_rng_state)
from mqvae.errors import AllRanksError, Diverged, UserError
from mqvae.evaluation import evaluate as evaluation_fns  # make_image_quality looked up at each call: stand-ins can replace it
from mqvae.evaluation.evaluate import latents_and_codes, measures_quality
from mqvae.io.files import append_line, os_error, write_text
from mqvae.method.hypergradients import batch_norm_buffers
from mqvae.io.provenance import provenance
from mqvae.evaluation.reports import codebook_figure
from mqvae.io.tracking import TensorBoard, drop_after

from .run_folder import write_config

# Betty logs set-up chatter at INFO; the progress bar and log.jsonl are this toolkit's interface.
get_logger().setLevel(logging.WARNING)

# Optimizer steps in a row with a zero gradient (Level._note_gradient) after which a level is reported as not learning.
ZERO_GRADIENT_STEPS = 50
# Losses noted (note_finite) that are folded into the finiteness flag at once: four operations for all of them, instead
# of two per loss and iteration.
FINITE_FOLD = 64


def _mismatch(exc: BaseException) -> str:
    """One line of what did not fit: torch's load_state_dict lists every missing, unexpected or misshapen entry
    on lines of their own; the first is shown whole, and the others counted."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        header, problems = lines[0].rstrip(":"), lines[1:]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"{header}: {problems[0][:500]}{more}"
    text = " ".join(lines) or type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


class LevelEngine(Engine):
    def __init__(self, cfg, problems, dependencies, model, datasets, device, run_dir: Path):
        self.cfg, self.model, self.datasets, self.run_dir = cfg, model, datasets, Path(run_dir)
        self.target_device = device
        # Data-parallel (mqvae.runtime.distributed): only rank 0 writes the run folder, prints and evaluates.
        self.ranks, self.writes = distributed.world_size(), distributed.rank() == 0
        self.train_time = 0.0  # seconds spent in training iterations, excluding evaluation and saving
        self.checkpoint_step = None  # iteration of the last checkpoint written or resumed from
        self.config_written = False  # whether run_dir/config.yaml is this engine's cfg
        # All losses since the start finite: a flag on the device, read only by check_finite, and the losses noted
        # since it was last updated (note_finite).
        self._finite = torch.ones((), dtype=torch.bool, device=device)
        self._unfolded: list[torch.Tensor] = []
        # (1 under perf.cuda_graphs: a replayed iteration's losses are overwritten by the next replay.)
        self.finite_fold = FINITE_FOLD
        # perf.cuda_graphs: the iteration's graphs (engines.graphs.IterationGraphs), None in eager mode.
        self.graphs = None
        # Warnings of this run (warn): each once, kept until log.jsonl is open (run), then written as records.
        self._warned: set[str] = set()
        self._pending_records: list[dict] = []
        self._log = None  # log.jsonl while run() trains
        self._log_started = False  # log.jsonl is this run's (run() has opened it)
        # logging.tensorboard: the writer, from run() until close(), which the caller makes on every exit path.
        self.tensorboard: TensorBoard | None = None
        self._pictured_step = None  # the step of the pictures last sent to TensorBoard
        self._batch_norm_buffers: list[torch.Tensor] | None = None  # (share_batch_norm_statistics)
        engine_cfg = EngineConfig(train_iters=cfg.train.iters, roll_back=cfg.hypergradient.roll_back, logger_type="none")
        super().__init__(problems=problems, config=engine_cfg, dependencies=dependencies)
        # Quantizer maintenance follows the real forward of the level that trains the encoder.
        encoder = getattr(model, "encoder", None)
        self.encoder_level = next((p for p in problems if any(m is encoder for m in p.module.modules())), None)

    def configure_systems(self):
        # Betty's own version initializes the process group itself and divides by torch.cuda.device_count() for
        # distributed strategies, which fails on a CPU-only machine: the process group is torchrun's, joined
        # before the model is built (mqvae.runtime.distributed.start), and the device is the one it gave this rank.
        self.device = self.target_device
        if self.ranks == 1:
            return {"strategy": "default", "backend": None, "world_size": 1, "rank": 0, "local_rank": 0}
        rank = distributed.rank()
        local = self.device.index if self.device.type == "cuda" else 0
        return {"strategy": "distributed", "backend": torch.distributed.get_backend(), "world_size": self.ranks,
                "rank": rank, "local_rank": local}

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "levels": {p.name: p.module.state_dict() for p in self.problems},
            "optimizers": {p.name: p.optimizer.state_dict() for p in self.problems},
            "schedulers": {p.name: p.scheduler.state_dict() for p in self.problems if p.scheduler is not None},
            "streams": {p.name: p.stream.state_dict() for p in self.problems if p.stream is not None},
            "progress": {p.name: p.progress_state() for p in self.problems},
            "step": self.global_step,
            "train_time": self.train_time,
            "rng": rng_state(),
            "world_size": self.ranks,
            # A prior's source run, as it was when the prior started (mqvae.method.prior.source_sha256).
            **({"source_sha256": self.model.source_sha256} if hasattr(self.model, "source_sha256") else {}),
        }

    def load_state_dict(self, state: dict, where: str) -> None:
        names = sorted(p.name for p in self.problems)
        if state.get("world_size", 1) != self.ranks:
            # Each rank's batches are its slice of the global batch: another number of ranks is another run.
            raise AllRanksError(f"--resume: {where} was trained with {state.get('world_size', 1)} data-parallel "
                                f"rank(s); resume it with as many (torchrun --nproc_per_node), not {self.ranks}")
        recorded, now = state.get("source_sha256"), getattr(self.model, "source_sha256", None)
        if recorded is not None and recorded != now:
            raise AllRanksError(f"--resume: {where} is a prior trained on the codes of {self.cfg.prior.run} as it "
                                "was when the prior started; that run's config.yaml or checkpoint.pt has changed since "
                                "(extended or retrained), so its codes are no longer the ones learned on; start the "
                                "prior again (its command with --overwrite)")
        if sorted(state["levels"]) != names:
            raise AllRanksError(f"--resume: {where} holds levels {sorted(state['levels'])}, the config has {names}")
        try:
            for p in self.problems:
                p.module.load_state_dict(state["levels"][p.name])
                built = [dict(group) for group in p.optimizer.param_groups]
                p.optimizer.load_state_dict(state["optimizers"][p.name])
                keep_run_settings(p.optimizer.param_groups, built)
                check_hyperparameters(p.optimizer.param_groups, built, where)
                if p.scheduler is not None:
                    p.scheduler.load_state_dict(state["schedulers"][p.name])
                if p.stream is not None:
                    p.stream.load_state_dict(state["streams"][p.name])
                    p.train_data_iterator = [iter(p.stream)]
                if "progress" in state:
                    p.load_progress_state(state["progress"][p.name])
                else:  # written before the levels' progress was saved: every level stepped every iteration
                    p._count = state["step"]
        except (KeyError, RuntimeError, ValueError) as exc:
            raise AllRanksError(f"--resume: {where} does not match this config: {_mismatch(exc)}") from None
        self.global_step = self.checkpoint_step = state["step"]
        self.train_time = state.get("train_time", 0.0)
        set_rng_state(state["rng"])

    def save(self) -> None:
        """Write the checkpoint, unless a loss since the last check or the state itself is not finite: a
        checkpoint never holds NaN, so the last good one survives a divergence."""
        self.check_finite()
        self.report_flagged_warnings()
        state = self.state_dict()
        bad = non_finite_entries(state)
        if bad:
            raise Diverged(self._stopped(f"{bad[0]} holds non-finite values"))
        self.check_replicas()
        if not self.writes:
            self.checkpoint_step = self.global_step
            return
        if self.config_written:
            save_checkpoint(self.run_dir / "checkpoint.pt", state)
        else:
            # A resumed run's config.yaml (extended iterations, new intervals) goes with its first new checkpoint,
            # so a resume that fails before one (or in writing it) leaves the folder as it was.
            config = self.run_dir / "config.yaml"
            previous = config.read_text()
            self.write_config()
            try:
                save_checkpoint(self.run_dir / "checkpoint.pt", state)
            except BaseException:
                write_text(config, previous)
                self.config_written = False
                raise
        self.checkpoint_step = self.global_step
        if self.tensorboard is not None:
            self.tensorboard.flush()  # the events up to the checkpoint are on disk, as log.jsonl's lines are

    def check_replicas(self) -> None:
        """Data-parallel: every rank holds rank 0's model, bit for bit (one broadcast of the model per checkpoint).
        A difference is a bug of the data-parallel path, so the run stops rather than save one rank's state."""
        name = distributed.first_difference([(f"{p.name}.{key}", value) for p in self.problems
                                             for key, value in p.module.state_dict().items()])
        if name is not None:
            raise RuntimeError(f"data-parallel ranks hold different values of {name} at iteration {self.global_step}")

    def write_config(self) -> None:
        """run_dir/config.yaml := this engine's resolved config."""
        write_config(self.run_dir, self.cfg, provenance(self.device))
        self.config_written = True

    # -- finiteness -------------------------------------------------------------------------------
    def note_finite(self) -> None:
        """Note the losses of this iteration's steps (``Level.new_losses``) for the finiteness flag, into which they
        are folded ``finite_fold`` at a time (``_fold_finite``): no host synchronisation, and no operation in most
        steps."""
        # (A loss is one number; reshaped only where a level's is not 0-dim, so that they stack.)
        for p in self.problems:
            self._unfolded.extend(loss if loss.dim() == 0 else loss.reshape(()) for loss in p.new_losses)
            p.new_losses.clear()
        if len(self._unfolded) >= self.finite_fold:
            self._fold_finite()

    def _fold_finite(self) -> None:
        """The flag := the flag and every noted loss finite, on the device."""
        if self._unfolded:
            self._finite.logical_and_(torch.isfinite(torch.stack(self._unfolded)).all())  # (in place: engines.graphs)
            self._unfolded.clear()

    def check_finite(self) -> None:
        """The flag's one host sync, at logging steps and before every checkpoint. Data-parallel: the ranks' flags
        are combined, so every rank stops at the same step (a NaN on one rank reaches all through the averaged
        gradients anyway) and rank 0 says so."""
        self._fold_finite()
        finite = self._finite.to(torch.int32)
        if self.ranks > 1:
            finite = distributed.sum_(finite.clone()) == self.ranks
        if not bool(finite):
            losses = ", ".join(f"{p.name}.loss {p.last_stats['loss'].item():.4g}" for p in self.problems
                               if "loss" in p.last_stats)
            raise Diverged(self._stopped(f"a loss became NaN or infinite (now {losses})"))

    def _stopped(self, what: str) -> str:
        checkpoint = self.run_dir / "checkpoint.pt"
        kept = (f"the last good checkpoint, iteration {self.checkpoint_step}, is kept in {checkpoint}"
                if self.checkpoint_step is not None else "no checkpoint was written")
        return f"train: {what} by iteration {self.global_step}; stopped ({kept})"

    # -- warnings ---------------------------------------------------------------------------------
    def warn(self, message: str, terminal: bool = True) -> None:
        """A warning, once per run: one line on stderr (``terminal``; library chatter is not) and a record
        ``{"step", "warning"}`` in log.jsonl, so that the run folder keeps what the terminal showed."""
        if message in self._warned or not self.writes:
            return
        self._warned.add(message)
        if terminal:
            tqdm.write(f"warning: {message}", file=sys.stderr)
        self._pending_records.append({"step": self.global_step, "warning": message})
        self._write_pending()

    def _write_pending(self) -> None:
        if not self._log_started or not self._pending_records:
            return  # kept until run() has opened log.jsonl (a warning while the engine is built)
        path = self.run_dir / "log.jsonl"
        try:
            log = self._log or open(path, "a")  # after run(): e.g. a warning of the final evaluation
        except OSError as exc:
            raise os_error(path, exc) from None
        try:
            for record in self._pending_records:
                self.record(log, path, record)
        finally:
            if log is not self._log:
                log.close()
        self._pending_records.clear()

    # -- records and pictures ---------------------------------------------------------------------
    def record(self, log, path: Path, record: dict) -> None:
        """One record into log.jsonl and, with logging.tensorboard, its numbers into TensorBoard: every record
        goes through here, so both hold the same scalars. ``log`` is None on a data-parallel rank other than 0."""
        if log is None:
            return
        append_line(log, path, json.dumps(record))
        if self.tensorboard is not None:
            self.tensorboard.scalars(record)

    def evaluation(self) -> tuple[dict, torch.Tensor | None]:
        """The test metrics of a ``train.eval_every`` step or of the last iteration (and the code counts behind
        them): FID / IS too where the task follows them over training (``quality_during_training``) and ``eval``
        allows."""
        task, settings = self.model.task, self.cfg.eval
        quality = (evaluation_fns.make_image_quality(self.device, settings.download_weights)
                   if task.quality_during_training and measures_quality(task, settings) else None)
        return task.evaluate(self.model, self.datasets.test, self.cfg.data.batch_size, self.device, quality)

    def pictures(self, metrics: dict, counts: torch.Tensor | None) -> dict:
        """The pictures of the model as it is now, by file name without .png: the task's picture (``recon``,
        ``samples``), titled by the run, the iteration and the task's test metric over the whole test split
        (``metrics``: the evaluation of this iteration), and, where the evaluation counted codes (``counts``:
        code usage over the test set), ``codebook``."""
        model, test, key = self.model, self.datasets.test, self.model.task.curve_key
        title = f"{self.run_dir.name}: iteration {self.global_step}, {key} {metrics[key]:.5g}"
        pictures = {model.task.picture_name: model.task.picture(model, test, self.device, title)}
        if counts is not None:
            pictures["codebook"] = codebook_figure(counts, *latents_and_codes(model, test, self.device))
        return pictures

    def track_pictures(self, pictures: dict) -> None:
        """The pictures to TensorBoard at this step, once: a run's final pictures are its last evaluation's
        when that was at the last step."""
        if self.tensorboard is not None and self._pictured_step != self.global_step:
            self.tensorboard.figures(pictures, self.global_step)
            self._pictured_step = self.global_step

    def close(self) -> None:
        """Close the TensorBoard writer, writing its last events (none to close without logging.tensorboard)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    # -- the loop ---------------------------------------------------------------------------------
    def run(self):
        cfg = self.cfg.train
        self.train()
        log_path = self.run_dir / "log.jsonl"
        try:
            log = self._log = open(log_path, "a") if self.writes else None
        except OSError as exc:
            raise os_error(log_path, exc) from None
        self._log_started = self.writes
        if self.cfg.logging.tensorboard and self.tensorboard is None and self.writes:
            # A resumed run drops the events logged after its checkpoint, as it drops those lines of log.jsonl.
            purge_step = None if self.checkpoint_step is None else self.checkpoint_step + 1
            if purge_step is not None:
                drop_after(self.run_dir, self.checkpoint_step)
            self.tensorboard = TensorBoard(self.run_dir, purge_step)
        self._write_pending()
        # disable=None: a bar only on a terminal, so a redirected stderr holds nothing but an error's one line
        # (log.jsonl records the progress either way).
        bar = tqdm(total=cfg.iters, initial=self.global_step, desc=self.run_dir.name, dynamic_ncols=True, mininterval=0.5,
                   disable=None if self.writes else True)
        try:
            for step in range(self.global_step + 1, cfg.iters + 1):
                start = time.perf_counter()
                self.global_step = step
                self.schedule_quantizer(step)
                self.iteration()
                self.maintain()
                self.share_batch_norm_statistics()
                self.report_level_warnings()
                if step % cfg.log_every == 0 or step == cfg.iters:
                    self.check_finite()
                    self.check_learning()
                    self.report_flagged_warnings()
                    record = self.training_record(step)
                    self.train_time += time.perf_counter() - start
                    record["time_s"] = round(self.train_time, 4)
                    self.record(log, log_path, record)
                    bar.set_postfix({k.split(".")[-1] if len(self.problems) == 1 else k: f"{v:.4g}"
                                     for k, v in record.items() if k.endswith((".loss", ".perplexity"))}, refresh=False)
                else:
                    self.train_time += time.perf_counter() - start
                # The last iteration is evaluated too, as it is logged: the test curve ends where training does.
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.iters):  # every rank: its shard
                    metrics, counts = self.evaluation()
                    self.record(log, log_path, {"step": step, "time_s": round(self.train_time, 4), **metrics})
                    if self.tensorboard is not None:  # (rank 0's alone)
                        self.track_pictures(self.pictures(metrics, counts))
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.save()
                bar.update(1)
        finally:
            bar.close()
            if log is not None:
                log.close()
            self._log = None

    def iteration(self) -> None:
        """The training iteration ``global_step``: its steps and the note of its losses, replayed as CUDA graphs
        under ``perf.cuda_graphs``."""
        if self.graphs is not None:
            self.graphs.iteration(self.global_step)
        else:
            self.eager_iteration()

    def eager_iteration(self) -> None:
        self.train_step()
        self.note_finite()

    def train_step(self):
        for p in self.problems:
            p.begin_iteration(self.global_step)
        super().train_step()

    def report_level_warnings(self) -> None:
        """What the levels met inside their steps, once each (no host sync: every iteration)."""
        for p in self.problems:
            while p.warnings:
                self.warn(p.warnings.pop(0))

    def report_flagged_warnings(self) -> None:
        """The levels' ``flagged_warnings`` whose flag is true (e.g. a hypergradient that reduced to direct), once
        each: a host sync, at logging steps and before checkpoints only."""
        for p in self.problems:
            while p.flagged_warnings:
                flag, message = p.flagged_warnings.pop(0)
                if bool(flag):
                    self.warn(message)

    def check_learning(self) -> None:
        """A level whose parameters got a zero gradient for ZERO_GRADIENT_STEPS steps in a row: nothing in its
        loss reaches them (e.g. a level on the codebook whose loss only the task term, blocked by the plain
        straight-through estimator, would move), so they stay where they started."""
        for p in self.problems:
            if p.zero_gradient_steps() >= ZERO_GRADIENT_STEPS:
                self.warn(f"level '{p.name}' ({type(p).__name__}): its parameters got a zero gradient for "
                          f"{ZERO_GRADIENT_STEPS} optimizer steps in a row, so they do not learn; nothing in its loss "
                          "(loss_terms' 'loss') depends on them")

    def schedule_quantizer(self, step: int) -> None:
        """What of the quantizer follows a schedule over training (Gumbel-VQ's temperature), set before iteration
        ``step``, outside any forward and any CUDA graph. A prior's model trains no quantizer (and has none)."""
        if self.encoder_level is not None:
            self.model.quantizer.begin_iteration(step, self.cfg.train.iters)

    def maintain(self) -> None:
        """Explicit quantizer maintenance (dead-code replacement, running statistics) on this iteration's
        real forward; never inside a forward, so perturbed evaluations stay pure. Data-parallel: rank 0 maintains
        on the global batch (the ranks' batches in rank order, as one process holds it) and its quantizer is
        broadcast, so statistics, dead codes and replacement candidates are those of one process."""
        forward = self.encoder_level.last_forward if self.encoder_level is not None else None
        if forward is None or not self.model.quantizer.maintains:  # (a prior's model has no trained quantizer)
            return
        quantizer = self.model.quantizer
        if self.ranks == 1:
            quantizer.maintain(*forward)
            return
        z_e, out = forward
        z_e = distributed.gather(z_e)
        out = dataclasses.replace(out, z_q=distributed.gather(out.z_q), indices=distributed.gather(out.indices),
                                  counts=distributed.sum_(out.counts.clone()))
        if self.writes:
            quantizer.maintain(z_e, out)
        else:  # rank 0's maintenance, broadcast below, is this rank's: its forwards were maintained
            quantizer.unmaintained_forwards = 0
        distributed.broadcast_([*quantizer.parameters(), *quantizer.buffers()])

    def share_batch_norm_statistics(self) -> None:
        """Data-parallel: every rank takes rank 0's BatchNorm running statistics after each iteration (as DDP's
        broadcast_buffers does), so the replicas stay identical and evaluate alike. Each rank normalized its own
        batch, so these are rank 0's statistics, not the global batch's (model.sync_batch_norm gives those)."""
        if self.ranks > 1:
            if self._batch_norm_buffers is None:
                self._batch_norm_buffers = batch_norm_buffers(self.model)
            distributed.broadcast_(self._batch_norm_buffers)

    def training_record(self, step: int) -> dict:
        """The levels' latest loss terms as numbers (a host sync, only at logging steps)."""
        keys, values = [], []
        for p in self.problems:
            # The loss terms, and an upper level's Fig. 6 quantities of its latest hypergradient.
            for key, value in [*p.last_stats.items(), *p.hypergradient_stats().items()]:
                if torch.is_tensor(value) and value.numel() == 1:
                    keys.append(f"{p.name}.{key}")
                    values.append(value.detach().reshape(1).double())
        if values and self.ranks > 1:
            # Data-parallel: each rank's batch mean; their mean is the global batch's (a perplexity is averaged).
            values = [torch.cat(values)]
            distributed.average_(values)
        numbers = torch.cat(values).tolist() if values else []
        return {"step": step, **dict(zip(keys, numbers))}
