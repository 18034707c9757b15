"""The model and quantizer kinds a config names (``model.kind``, ``quantizer.kind``), and the network built from them.

A model kind is a ``ModelKind`` subclass registered under its name (mqvae.registry.MODELS): the encoder and decoder
halves around the quantizer, and the task they serve. A quantizer kind is a ``mqvae.nn.quantizers.Quantizer``
subclass registered the same way (mqvae.registry.QUANTIZERS), built from the quantizer section. A plugin adds its
own with ``register_model`` and ``register_quantizer``; the shipped kinds are registered below like any other.
"""

from __future__ import annotations

from torch import nn

from mqvae.errors import UserError
from mqvae.evaluation import metrics
from mqvae.method.tasks import CLASSIFICATION, RECONSTRUCTION, Reconstruction, Task
from mqvae.nn.networks import Decoder, Encoder, QuantizedNetwork
from mqvae.nn.quantizers import GumbelQuantizer, Quantizer, VectorQuantizer
from mqvae.nn.vqgan import VQGANDecoder, VQGANEncoder, level_sides
from mqvae.registry import MODELS, QUANTIZERS


class ModelKind:
    """A ``model.kind``: the network's halves around the quantizer and the task they are trained for.

    ``width_keys``: the config keys that set the halves' widths, which the memory check names when the network is
    what does not fit (mqvae.config.feasibility). ``model_keys``: the keys of the model section (besides ``kind``)
    that the kind reads; any other set to a value other than its default is refused at load (mqvae.config.schema),
    as it would change nothing. None: not declared (a plugin's kind), nothing is refused. ``downsample_key``: the
    key that sets ``downsample``, which the geometry check names."""

    task: Task = RECONSTRUCTION
    width_keys: tuple[str, ...] = ("quantizer.dim",)
    model_keys: tuple[str, ...] | None = None
    downsample_key: str = "model.kind"

    @classmethod
    def halves(cls, cfg, channels: int, num_classes: int, image_size: int) -> tuple[nn.Module, nn.Module]:
        """(encoder, decoder) for the config ``cfg``: images of ``channels`` channels and side ``image_size`` to
        ``quantizer.dim``-wide latents, and back to the task's output (``num_classes`` for a classifier)."""
        raise NotImplementedError

    @classmethod
    def downsample(cls, model) -> int | None:
        """How many stride-2 stages the encoder has for the model section ``model``: the latent's side is the
        image's / 2^downsample, and a reconstruction's decoder doubles it back as often. None: the kind does not
        say."""
        return None

    @classmethod
    def check_settings(cls, cfg) -> None:
        """Reject settings of the model section that mean nothing for this kind or cannot be built, with one line
        naming the keys (a ``UserError``); ``cfg`` is the whole config. Called at load."""


def register_model(name: str):
    """Decorator: a ``ModelKind`` subclass as ``model.kind: name``."""
    return MODELS.register(name)


def register_quantizer(name: str):
    """Decorator: a ``Quantizer`` subclass as ``quantizer.kind: name``, built as ``cls(cfg.quantizer)``."""
    return QUANTIZERS.register(name)


@register_model("vqvae")
class VQVAEBackbone(ModelKind):
    """van den Oord et al.'s backbone for reconstruction (mqvae.nn.networks)."""

    width_keys = ("model.hidden_channels", "model.res_channels", "quantizer.dim")
    model_keys = ("hidden_channels", "res_channels", "num_res_blocks", "downsample", "norm", "sync_batch_norm")
    downsample_key = "model.downsample"

    @classmethod
    def halves(cls, cfg, channels, num_classes, image_size):
        return Encoder(channels, cfg.model, cfg.quantizer.dim), Decoder(channels, cfg.model, cfg.quantizer.dim)

    @classmethod
    def downsample(cls, model):
        return model.downsample


@register_model("vqgan")
class VQGANBackbone(ModelKind):
    """Esser et al.'s VQ-GAN encoder-decoder (taming-transformers), MQ-GAN's backbone (MQ-VAE App. G;
    mqvae.nn.vqgan), for reconstruction."""

    width_keys = ("model.hidden_channels", "model.z_channels", "quantizer.dim")
    model_keys = ("hidden_channels", "num_res_blocks", "ch_mult", "attn_resolutions", "z_channels", "quant_conv",
                  "z_norm", "dropout", "norm_groups")
    downsample_key = "model.ch_mult"

    @classmethod
    def halves(cls, cfg, channels, num_classes, image_size):
        model, dim = cfg.model, cfg.quantizer.dim
        sides = level_sides(image_size, len(model.ch_mult))
        unplaced = [side for side in model.attn_resolutions if side not in sides]
        if unplaced:
            raise UserError(f"model.attn_resolutions: {unplaced[0]} is the side of no level for {image_size}-px images "
                            f"(with {len(sides)} levels, model.ch_mult, the sides are {', '.join(map(str, sides))}); "
                            "attention there would never be placed")
        return VQGANEncoder(channels, model, dim, image_size), VQGANDecoder(channels, model, dim, image_size)

    @classmethod
    def downsample(cls, model):
        return len(model.ch_mult) - 1

    @classmethod
    def check_settings(cls, cfg):
        model = cfg.model
        if not model.ch_mult or min(model.ch_mult) < 1:
            raise UserError(f"model.ch_mult: expected one positive multiple of model.hidden_channels per level, got "
                            f"{model.ch_mult}")
        if model.attn_resolutions and min(model.attn_resolutions) < 1:
            raise UserError(f"model.attn_resolutions: expected feature-map sides of at least 1 px, got "
                            f"{model.attn_resolutions}")
        if model.num_res_blocks < 1:
            raise UserError("model.num_res_blocks: 0; the VQ-GAN's levels change width in their first residual "
                            "block, so each level needs at least 1")
        # conv_in's width, then each level's.
        widths = sorted({model.hidden_channels, *(model.hidden_channels * mult for mult in model.ch_mult)})
        if any(width % model.norm_groups for width in widths):
            raise UserError(f"model.norm_groups: {model.norm_groups} does not divide every width of the VQ-GAN "
                            f"(model.hidden_channels and its multiples by model.ch_mult: {', '.join(map(str, widths))}); "
                            "GroupNorm splits each width into norm_groups equal groups")
        if not model.quant_conv and model.z_channels not in (None, cfg.quantizer.dim):
            raise UserError(f"model.z_channels: {model.z_channels} with model.quant_conv: false; without the 1x1 "
                            f"convolutions z_channels is the code dim, quantizer.dim = {cfg.quantizer.dim} (or null)")


@register_model("resnet18")
class ResNet18(ModelKind):
    """torchvision's ResNet-18 quantized after layer2, for classification (Huh §5.1; mqvae.nn.resnet)."""

    task = CLASSIFICATION
    model_keys = ("sync_batch_norm",)

    @classmethod
    def halves(cls, cfg, channels, num_classes, image_size):
        from mqvae.nn.resnet import resnet18_halves  # torchvision's models, which the VQ-VAE does not need

        return resnet18_halves(channels, num_classes, cfg.quantizer.dim)

    @classmethod
    def downsample(cls, model):
        return 1  # layer2's stride; the CIFAR stem keeps the side


register_quantizer("vq")(VectorQuantizer)
register_quantizer("gumbel")(GumbelQuantizer)


def check_quantizer_config(cfg) -> None:
    """Reject combinations of quantizer settings that have no meaning for its kind, with one line naming the keys."""
    QUANTIZERS[cfg.kind].check_settings(cfg)


def build_quantizer(cfg) -> Quantizer:
    """The quantizer the quantizer section ``cfg`` describes."""
    check_quantizer_config(cfg)
    return QUANTIZERS[cfg.kind](cfg)


def task_for(cfg) -> Task:
    """The task of the config's model kind, with the distance ``loss.reconstruction`` names (one line where the kind
    is not trained to reconstruct images)."""
    task = MODELS[cfg.model.kind].task
    if (cfg.loss.reconstruction != "mse" and not isinstance(task, Reconstruction)) or (
            cfg.loss.perceptual_weight and not task.outputs_images):
        raise UserError(f"loss: model.kind: {cfg.model.kind} is trained for {task.name}, not to reconstruct images; "
                        "leave loss.reconstruction: mse and loss.perceptual_weight: 0")
    return task if cfg.loss.reconstruction == "mse" else Reconstruction(cfg.loss.reconstruction)


def build_model(cfg, channels: int, num_classes: int, image_size: int) -> QuantizedNetwork:
    """The network a config describes for images of ``channels`` channels and side ``image_size``, on the CPU (the
    engine moves it). The quantizer is built first: the draws of the codebook's initialization come before the
    halves' (runs stay the same seed for seed). With
    ``loss.perceptual_weight`` > 0 the LPIPS network is loaded first, so that missing weights stop the run at once."""
    task = task_for(cfg)
    perceptual = None
    if cfg.loss.perceptual_weight > 0:
        perceptual = metrics.perceptual_distance(cfg.loss.perceptual_weight, signed=cfg.data.range[0] < 0,
                                                 download_weights=cfg.eval.download_weights)
    quantizer = build_quantizer(cfg.quantizer)
    encoder, decoder = MODELS[cfg.model.kind].halves(cfg, channels, num_classes, image_size)
    return QuantizedNetwork(encoder, quantizer, decoder, task, range=cfg.data.range, perceptual=perceptual,
                            perceptual_weight=cfg.loss.perceptual_weight, image_channels=channels)
