"""A PixelCNN prior on the frozen codes of a finished reconstruction run (MQ-VAE Fig. 3).

``source_config`` reads and checks the run that ``prior.run`` names; ``load_source`` rebuilds its network from
its checkpoint; ``code_maps`` turns a data set into its code maps (the quantizer's indices of the encoder
output, H×W per image) once, so that a training step costs only the PixelCNN. ``PriorModel`` is what the
engine trains: the frozen source network and the ``GatedPixelCNN``, with ``PRIOR`` as its task (loss: the
cross-entropy of the code logits; test score: NLL in bits per code; picture: decoded samples).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mqvae.config import Config, DataConfig, config_from_dict, read_yaml
from mqvae.data import to_pixels
from mqvae.errors import UserError, quote
from mqvae.io.checkpoint import load_checkpoint
from mqvae.evaluation.evaluate import evaluating
from mqvae.nn.pixelcnn import GatedPixelCNN
from mqvae.method.tasks import RECONSTRUCTION, Scores, Task
from mqvae.registry import MODELS, PROBLEMS, TASKS, VALIDATORS


def source_config(run: str, where: str) -> Config:
    """The resolved config of the finished reconstruction run in folder ``run``; a one-line UserError naming
    ``where``'s prior.run for anything else."""
    folder = Path(run)
    missing = [name for name in ("config.yaml", "checkpoint.pt", "metrics.json") if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{where}: prior.run: {run} holds no finished run (no {', '.join(missing)}); train the source "
                        "run first")
    try:
        finished = json.loads((folder / "metrics.json").read_text(errors="replace"))
    except ValueError:
        finished = None
    if not isinstance(finished, dict):
        raise UserError(f"{where}: prior.run: {folder / 'metrics.json'} is not a run's metrics; train the source run again")
    if "diverged" in finished:
        raise UserError(f"{where}: prior.run: {run} diverged (its metrics.json says so); it has no codes to learn")
    cfg = config_from_dict(read_yaml(folder / "config.yaml"), str(folder / "config.yaml"))
    if cfg.prior.run:
        raise UserError(f"{where}: prior.run: {run} is itself a prior run; name a reconstruction run")
    if MODELS[cfg.model.kind].task is not RECONSTRUCTION:
        raise UserError(f"{where}: prior.run: {run} is a run of the {MODELS[cfg.model.kind].task.name} task "
                        f"(model.kind: {cfg.model.kind}); a prior decodes its samples, so it needs a reconstruction run")
    if cfg.quantizer.groups > 1:
        raise UserError(f"{where}: prior.run: {run} quantizes in {cfg.quantizer.groups} groups; the prior models one "
                        "code per position (quantizer.groups: 1)")
    return cfg


@VALIDATORS.register("prior")
def take_source(cfg: Config, where: str) -> None:
    """The config's check of ``prior.run`` (mqvae.registry.VALIDATORS): a prior's network is its source run's, so
    the run's model and quantizer sections become the config's (its config.yaml says what was used); the config
    may repeat them, not change them."""
    if not cfg.prior.run:
        return
    if cfg.prior.kernel % 2 == 0:
        raise UserError(f"{where}: prior.kernel: {cfg.prior.kernel} is even; the stacks' kernels need an odd side")
    source = source_config(cfg.prior.run, where)
    for section in ("model", "quantizer"):
        given = getattr(cfg, section)
        if given not in (type(given)(), getattr(source, section)):
            raise UserError(f"{where}: {section}: a prior's network is its source run's ({cfg.prior.run}); remove the "
                            f"{section} section")
        setattr(cfg, section, getattr(source, section))
    if cfg.data.name != source.data.name:
        raise UserError(f"{where}: data.name: {quote(cfg.data.name)}, but the source run {cfg.prior.run} was trained "
                        f"on {quote(source.data.name)}; a prior learns the codes of the source's data set")
    # The source's encoder codes images as it was trained to see them: at its image_size, in its range. As with the
    # network's sections, the config may leave them out (the default) or repeat them.
    for key in ("image_size", "range"):
        given, trained = getattr(cfg.data, key), getattr(source.data, key)
        if given not in (getattr(DataConfig(), key), trained):
            raise UserError(f"{where}: data.{key}: {quote(given)}, but the source run {cfg.prior.run} was trained with "
                            f"{quote(trained)}; a prior codes the images as its source saw them (leave data.{key} out)")
        setattr(cfg.data, key, trained)
    if cfg.data.random_crop:
        raise UserError(f"{where}: data.random_crop: a prior learns the code maps of the center-cropped images, "
                        "computed once before it trains; set it to false")


def load_source(cfg: Config, network: nn.Module) -> None:
    """Load the source run's trained parameters into ``network`` (built from ``cfg``, whose model and quantizer
    are the source's), level by level as the source's engine saved them, and freeze it."""
    source = source_config(cfg.prior.run, "prior")
    path = Path(cfg.prior.run, "checkpoint.pt")
    state = load_checkpoint(path, "prior.run")  # checked as a resume checks it: damage and foreign files are one line
    try:
        for level in source.levels:
            PROBLEMS[level.problem].module_of(network, level.params).load_state_dict(state["levels"][level.name])
    except (KeyError, RuntimeError, ValueError) as exc:  # another network's state
        summary = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"prior.run: {path} does not load into the run's own network ({summary})") from None
    network.requires_grad_(False)
    network.eval()


def source_sha256(run: str) -> str:
    """sha256 of the source run's config.yaml and checkpoint.pt: a prior trains on the codes of one state of its
    source, so a resume checks that the source has not changed since (a source run extended or retrained)."""
    digest = hashlib.sha256()
    for name in ("config.yaml", "checkpoint.pt"):
        with open(Path(run, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@torch.no_grad()
def code_maps(network, dataset, batch_size: int, device) -> TensorDataset:
    """(code map (H, W) long, label) of every image of ``dataset``: the quantizer's index of each encoder output
    vector, whose rows (quantizers.to_vectors) run over batch, height and width in that order."""
    codes, labels = [], []
    with evaluating(network):
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            z_e = network.encoder(x.to(device))
            indices = network.quantizer(z_e).indices[:, 0]
            codes.append(indices.reshape(z_e.shape[0], *z_e.shape[2:]).cpu())
            labels.append(torch.as_tensor(y).long())
    return TensorDataset(torch.cat(codes), torch.cat(labels))


class PriorModel(nn.Module):
    """The frozen source network and the PixelCNN on its code maps. ``images``: the test images (in the source's
    ``range``), the real side of FID; ``seed``: the seed of every draw of samples (so they are the same however the run was cut);
    ``source_sha256``: the source run's fingerprint (``source_sha256``), which the checkpoint records."""

    task: "PriorTask"

    def __init__(self, source: nn.Module, pixelcnn: GatedPixelCNN, code_shape: tuple[int, int], images, seed: int,
                 source_sha256: str):
        super().__init__()
        self.source, self.pixelcnn = source, pixelcnn
        self.code_shape, self.images, self.seed = code_shape, images, seed
        self.source_sha256 = source_sha256
        self.task = PRIOR

    def train(self, mode: bool = True):
        # The source stays frozen in eval mode (BatchNorm statistics, Gumbel-VQ's argmax) while the prior trains.
        super().train(mode)
        self.source.eval()
        return self

    def logits(self, batch) -> torch.Tensor:
        codes, labels = batch
        return self.pixelcnn(codes, labels if self.pixelcnn.num_classes else None)

    def loss(self, batch, weights: dict | None = None) -> dict:
        """The negative log-likelihood of the code maps (nats per code) under ``loss``, and in bits per code."""
        nll = self.task.loss(self.logits(batch), batch)
        return {"loss": nll, "nll_bits": nll / math.log(2)}

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Code maps (B, H, W) -> images, through the frozen codebook and decoder."""
        z_q = F.embedding(codes, self.source.quantizer.effective_codebook()).permute(0, 3, 1, 2)
        return self.source.decoder(z_q.contiguous())

    def samples(self, count: int, generator: torch.Generator, device) -> torch.Tensor:
        """``count`` decoded samples as [0, 1] pixels; class-conditional priors draw the classes in turn (0, 1, ...,
        0, 1, ...)."""
        labels = torch.arange(count, device=device) % max(self.pixelcnn.num_classes, 1)
        with evaluating(self):
            return to_pixels(self.decode(self.pixelcnn.sample(self.code_shape, labels, generator)),
                             self.source.range).clamp(0, 1)


class _PriorScores(Scores):
    def __init__(self):
        self.nll, self.positions = 0.0, 0

    def update(self, batch, output):
        self.nll += F.cross_entropy(output, batch[0], reduction="sum").item()
        self.positions += batch[0].numel()

    def compute(self):
        return {"test_nll_bits": self.nll / self.positions / math.log(2)}


class PriorTask(Task):
    """The prior's task: cross-entropy of the code logits. Test metrics: ``test_nll_bits`` (NLL per code, in
    bits; a uniform prior has log2 K) and with an ``ImageQuality`` ``fid`` and ``is`` of decoded samples against
    the test images, as many samples as test images (LPIPS compares pairs, and samples have no partner).
    samples.png: decoded samples."""

    name = "prior"
    curve_key = "test_nll_bits"
    curve_title = "test NLL (bits per code)"
    outputs_images = True
    picture_name = "samples"
    image_metrics = ("fid", "is")
    extra_curves = (("fid", "FID of samples"),)
    # MQ-VAE Fig. 3 follows FID over the prior's training: each evaluation measures it where it can.
    quality_during_training = True

    def loss(self, output, batch):
        return F.cross_entropy(output, batch[0])

    def scores(self, image_quality=None):
        return _PriorScores()

    @torch.no_grad()
    def evaluate(self, model, dataset, batch_size: int, device, image_quality=None):
        scores = self.scores()
        with evaluating(model):
            for codes, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                batch = (codes.to(device), labels.to(device))
                scores.update(batch, model.logits(batch))
        metrics = scores.compute()
        if image_quality is not None:
            generator = torch.Generator(device).manual_seed(model.seed)
            for real, _ in DataLoader(model.images, batch_size=batch_size, shuffle=False):
                image_quality.update(to_pixels(real, model.source.range), model.samples(real.shape[0], generator, device))
            quality = image_quality.compute()
            metrics.update({key: quality[key] for name in self.image_metrics for key in (name, f"{name}_reason")})
        return metrics, None

    def picture(self, model, dataset, device, title):
        from mqvae.evaluation.reports import samples_figure

        return samples_figure(model.samples(64, torch.Generator(device).manual_seed(model.seed), device), title)


PRIOR = PriorTask()
TASKS.add(PRIOR.name, PRIOR)
