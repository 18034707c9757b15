"""What the network is trained for: reconstruction (the VQ-VAE) or classification (the ResNet-18).

A ``Task`` carries everything that differs between the two: the task loss of MQ-VAE Eq. 6, the test metrics
``evaluate`` accumulates, the test metric the training curves show, whether the network's output is an
image of the input's size (then the layers must fit the images and the final evaluation measures FID / IS /
LPIPS), and the picture a run writes as recon.png. Each model kind names its task (``mqvae.method.models``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mqvae.runtime import distributed
from mqvae.errors import UserError
from mqvae.evaluation.metrics import IMAGE_QUALITY
from mqvae.registry import MODELS, TASKS


class Scores:
    """A task's test metrics, accumulated batch by batch over the test split."""

    def update(self, batch, output: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def compute(self) -> dict:  # pragma: no cover - interface
        """The metrics, over every data-parallel rank's share of the test split (mqvae.runtime.distributed)."""
        raise NotImplementedError


class Task:
    """The interface of the tasks: reconstruction, classification and the prior (``mqvae.method.prior``)."""

    name: str
    # The test metric of the training curves (curves.png, the sweep's results.png); a log.jsonl record that
    # holds it is an evaluation. ``curve_title`` is its panel's title in curves.png.
    curve_key: str
    curve_title: str
    # The output is an image of the input's size: the layers must give it back at that size, and the final
    # evaluation measures FID / IS / LPIPS of the outputs.
    outputs_images: bool
    # The file name (without .png) of the task's picture; the image-quality metrics the final evaluation gives
    # where outputs_images; further test metrics curves.png plots, as (key, title); whether the evaluations during
    # training measure those image-quality metrics too (else only the final one does).
    picture_name = "recon"
    image_metrics = IMAGE_QUALITY
    extra_curves: tuple[tuple[str, str], ...] = ()
    quality_during_training = False

    def loss(self, output: torch.Tensor, batch) -> torch.Tensor:  # pragma: no cover - interface
        """L_task of MQ-VAE Eq. 6 for a batch (x, y) and the network's output."""
        raise NotImplementedError

    def scores(self, image_quality=None) -> Scores:  # pragma: no cover - interface
        """An empty accumulator of this task's test metrics; ``image_quality`` (``metrics.ImageQuality``) is
        fed the outputs too, where the task has images."""
        raise NotImplementedError

    def evaluate(self, model, dataset, batch_size: int, device, image_quality=None) -> tuple[dict, object]:
        """The test metrics of ``model`` over ``dataset`` and the code counts behind them (None where the task
        has none): by default ``evaluation.evaluate``, the quantized network's."""
        from mqvae.evaluation.evaluate import evaluate

        return evaluate(model, dataset, batch_size, device, image_quality)

    def picture(self, model, dataset, device, title: str):  # pragma: no cover - interface
        """The matplotlib figure of <picture_name>.png under ``title``: what the network makes of test images
        (``evaluation.shown_indices``: spread over the classes)."""
        raise NotImplementedError


class _ReconstructionScores(Scores):
    def __init__(self, image_quality):
        self.image_quality = image_quality
        self.squared_error, self.images, self.pixels = 0.0, 0, 0

    def update(self, batch, output):
        x, _ = batch
        self.squared_error += F.mse_loss(output, x, reduction="sum").item()
        self.images += x.shape[0]
        self.pixels = x[0].numel()
        if self.image_quality is not None:
            self.image_quality.update(x, output)

    def compute(self):
        squared_error, images = distributed.sum_numbers(self.squared_error, self.images)
        metrics = {"test_mse": squared_error / (images * max(distributed.gather_objects(self.pixels)))}
        if self.image_quality is not None:
            metrics.update(self.image_quality.compute())
        return metrics


class Reconstruction(Task):
    """The VQ-VAE's task: per-pixel MSE to the input. Test metrics: ``test_mse`` (per pixel), and with an
    ``ImageQuality`` ``fid``, ``is``, ``lpips`` with their ``*_reason``. recon.png: originals above their
    reconstructions."""

    name = "reconstruction"
    curve_key = "test_mse"
    curve_title = "test MSE (per pixel)"
    outputs_images = True

    def __init__(self, distance: str = "mse"):
        # loss.reconstruction: the per-pixel distance of L_task, mse or l1 (VQ-GAN's); the test metric stays the MSE.
        self.distance = distance

    def loss(self, output, batch):
        x, _ = batch
        # A stride-2 stage floors an odd side (7 -> 3), so the decoder returns another size; mse_loss would
        # broadcast or fail deep inside torch instead of saying why.
        if output.shape != x.shape:
            raise UserError(
                f"the decoder returns {tuple(output.shape[-2:])} images for {tuple(x.shape[-2:])} inputs: the image "
                "side must be divisible by 2 to the encoder's stride-2 stages (model.downsample; len(model.ch_mult) - 1 "
                "for kind vqgan), and 28-px MNIST allows 2 at most"
            )
        return F.mse_loss(output, x) if self.distance == "mse" else F.l1_loss(output, x)

    def scores(self, image_quality=None):
        return _ReconstructionScores(image_quality)

    def picture(self, model, dataset, device, title):
        from mqvae.evaluation.evaluate import reconstructions
        from mqvae.evaluation.reports import recon_figure

        return recon_figure(*reconstructions(model, dataset, 32, device), title)


class _ClassificationScores(Scores):
    def __init__(self):
        self.nll, self.images, self.predictions, self.labels = 0.0, 0, [], []

    def update(self, batch, output):
        _, y = batch
        self.nll += F.cross_entropy(output, y, reduction="sum").item()
        self.images += y.shape[0]
        self.predictions.append(output.argmax(1).cpu())
        self.labels.append(y.cpu())

    def compute(self):
        from mqvae.evaluation.metrics import macro_f1

        local = [torch.cat(part) if part else torch.zeros(0, dtype=torch.long) for part in (self.predictions, self.labels)]
        predictions, labels = (torch.cat(parts) for parts in zip(*distributed.gather_objects(local)))
        nll, images = distributed.sum_numbers(self.nll, self.images)
        return {"accuracy": float((predictions == labels).float().mean()), "f1": macro_f1(predictions, labels),
                "cross_entropy": nll / images}


class Classification(Task):
    """The classifier's task: cross-entropy of the logits. Test metrics: ``accuracy``, ``f1`` (macro) and
    ``cross_entropy`` (mean per image). recon.png: test images titled "predicted (true)"."""

    name = "classification"
    curve_key = "accuracy"
    curve_title = "test accuracy"
    outputs_images = False

    def loss(self, output, batch):
        _, y = batch
        return F.cross_entropy(output, y)

    def scores(self, image_quality=None):
        return _ClassificationScores()

    def picture(self, model, dataset, device, title):
        from mqvae.evaluation.evaluate import predictions
        from mqvae.evaluation.reports import prediction_figure

        return prediction_figure(*predictions(model, dataset, 32, device), title)


RECONSTRUCTION = Reconstruction()
CLASSIFICATION = Classification()
TASKS.add(RECONSTRUCTION.name, RECONSTRUCTION)
TASKS.add(CLASSIFICATION.name, CLASSIFICATION)


def task_of(cfg) -> Task:
    """The task a config's run is trained for (a sweep's curves name its metric): the prior's (``prior.run``,
    registered by mqvae.method.prior), else its model kind's (mqvae.registry.MODELS)."""
    return TASKS["prior"] if cfg.prior.run else MODELS[cfg.model.kind].task
