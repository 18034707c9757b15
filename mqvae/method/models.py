"""The model and quantizer kinds a config names (``model.kind``, ``quantizer.kind``), and the network built from them.

A model kind is a ``ModelKind`` subclass registered under its name (mqvae.registry.MODELS): the encoder and decoder
halves around the quantizer, and the task they serve. A quantizer kind is a ``mqvae.nn.quantizers.Quantizer``
subclass registered the same way (mqvae.registry.QUANTIZERS), built from the quantizer section. A plugin adds its
own with ``register_model`` and ``register_quantizer``; the shipped kinds are registered below like any other.
"""

from __future__ import annotations

from torch import nn

from mqvae.method.tasks import CLASSIFICATION, RECONSTRUCTION, Task
from mqvae.nn.networks import Decoder, Encoder, QuantizedNetwork
from mqvae.nn.quantizers import GumbelQuantizer, Quantizer, VectorQuantizer
from mqvae.registry import MODELS, QUANTIZERS


class ModelKind:
    """A ``model.kind``: the network's halves around the quantizer and the task they are trained for.

    ``width_keys``: the config keys that set the halves' widths, which the memory check names when the network is
    what does not fit (mqvae.config.feasibility); ``uses_norm``: whether ``model.norm`` applies."""

    task: Task = RECONSTRUCTION
    width_keys: tuple[str, ...] = ("quantizer.dim",)
    uses_norm: bool = False

    @classmethod
    def halves(cls, cfg, channels: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
        """(encoder, decoder) for the config ``cfg``: images of ``channels`` channels to ``quantizer.dim``-wide
        latents, and back to the task's output (``num_classes`` for a classifier)."""
        raise NotImplementedError


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
    uses_norm = True

    @classmethod
    def halves(cls, cfg, channels, num_classes):
        return Encoder(channels, cfg.model, cfg.quantizer.dim), Decoder(channels, cfg.model, cfg.quantizer.dim)


@register_model("resnet18")
class ResNet18(ModelKind):
    """torchvision's ResNet-18 quantized after layer2, for classification (Huh §5.1; mqvae.nn.resnet)."""

    task = CLASSIFICATION

    @classmethod
    def halves(cls, cfg, channels, num_classes):
        from mqvae.nn.resnet import resnet18_halves  # torchvision's models, which the VQ-VAE does not need

        return resnet18_halves(channels, num_classes, cfg.quantizer.dim)


register_quantizer("vq")(VectorQuantizer)
register_quantizer("gumbel")(GumbelQuantizer)


def check_quantizer_config(cfg) -> None:
    """Reject combinations of quantizer settings that have no meaning for its kind, with one line naming the keys."""
    QUANTIZERS[cfg.kind].check_settings(cfg)


def build_quantizer(cfg) -> Quantizer:
    """The quantizer the quantizer section ``cfg`` describes."""
    check_quantizer_config(cfg)
    return QUANTIZERS[cfg.kind](cfg)


def build_model(cfg, channels: int, num_classes: int) -> QuantizedNetwork:
    """The network a config describes, on the CPU (the engine moves it). The quantizer is built first: the draws of
    the codebook's initialization come before the halves' (runs stay the same seed for seed)."""
    quantizer = build_quantizer(cfg.quantizer)
    kind = MODELS[cfg.model.kind]
    encoder, decoder = kind.halves(cfg, channels, num_classes)
    return QuantizedNetwork(encoder, quantizer, decoder, kind.task, cfg.data.range)
