"""Can a config run on its data set and device? Checked once the data set is known, before the model is built.

Nothing real is allocated: the network is built on the meta device (tensors with shapes, no memory) and run
there on one image, and the quantizer, whose operations have no meta kernels, is sized from its config. So a
config with ``model.hidden_channels: 1e12`` fails in milliseconds instead of swapping the machine to a halt.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
from torch import nn

from mqvae.config import Config, LevelConfig, LossConfig, QuantizerConfig, quote
from mqvae.errors import UserError
from mqvae.method.models import build_model
from mqvae.registry import MODELS, QUANTIZERS

# The toolkit trains in float32.
FLOAT_BYTES = 4
# The backward needs the outputs a forward keeps, and then holds a gradient of the same size for each.
AUTOGRAD_FACTOR = 2
# Tensors the quantizer makes per latent vector, each as wide as the vector (and Gumbel-VQ's logits): z, q, z_q
# and the losses' differences for nearest-code VQ; the logits, log q, q and the sample for Gumbel-VQ.
QUANTIZER_COPIES = 4


@dataclass
class MemoryEstimate:
    """Bytes a training run holds at once, by what a user would change to lower them."""

    codebook: int  # the quantizer's parameters with their gradients and optimizer state, and its buffers
    network: int  # the same for the encoder and decoder
    activations: int  # one batch's forward outputs, kept for the backward, and their gradients

    @property
    def total(self) -> int:
        return self.codebook + self.network + self.activations


def check_feasible(cfg: Config, channels: int, image_size: int, num_classes: int, device: torch.device) -> None:
    """Raise a one-line UserError when the model does not fit ``image_size``-pixel images, or when it plainly
    needs more memory than ``device`` has."""
    _check_geometry(cfg, channels, image_size, num_classes)
    _check_batch_statistics(cfg, image_size)
    estimate = estimate_memory(cfg, channels, image_size, num_classes)
    available = available_memory(device)
    if estimate.total > available:
        key = _dominant_key(cfg, estimate)
        owner = f"device {device}" if device.type == "cuda" else "this machine"
        raise UserError(f"{key}: the run needs an estimated {_gib(estimate.total)} (parameters, gradients and "
                        f"optimizer state {_gib(estimate.codebook + estimate.network)}, one batch's activations "
                        f"{_gib(estimate.activations)}), more than the {_gib(available)} of {owner}; lower {key}")


def _check_batch_statistics(cfg: Config, image_size: int) -> None:
    """Training-mode BatchNorm needs at least two values per channel; the fewest are at the latent, batch_size
    vectors of (image_size / 2^downsample)^2 positions."""
    kind = MODELS[cfg.model.kind]
    if "norm" not in (kind.model_keys or ()) or cfg.model.norm != "batch":
        return
    side = image_size // 2**kind.downsample(cfg.model)
    values = cfg.data.batch_size * side**2
    if values < 2:
        raise UserError(f"data.batch_size: model.norm: batch needs at least 2 values per channel, and a batch of "
                        f"{cfg.data.batch_size} with a {side}-px latent has {values}; "
                        f"raise data.batch_size or lower {kind.downsample_key}")


def available_memory(device: torch.device) -> int:
    """Bytes of memory ``device`` has: a CUDA device's total memory, otherwise the machine's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate_memory(cfg: Config, channels: int, image_size: int, num_classes: int) -> MemoryEstimate:
    """What a training step holds. Each level's optimizer is counted over all parameters, an upper bound (a level
    trains a part of the model); parameters are counted once, as the levels share the model."""
    copies = 2 + sum(_optimizer_states(level) for level in cfg.levels)  # the parameter, its gradient, the states
    network = network_size(cfg, channels, image_size, num_classes)
    codebook_parameters, codebook_buffer_bytes = quantizer_size(cfg.quantizer)
    quantizer_width = QUANTIZERS[cfg.quantizer.kind].activation_width(cfg.quantizer)
    per_image = network.activations + QUANTIZER_COPIES * network.positions * quantizer_width
    return MemoryEstimate(
        codebook=FLOAT_BYTES * copies * codebook_parameters + codebook_buffer_bytes,
        network=FLOAT_BYTES * copies * network.parameters + network.buffer_bytes,
        activations=FLOAT_BYTES * AUTOGRAD_FACTOR * cfg.data.batch_size * per_image,
    )


def _optimizer_states(level: LevelConfig) -> int:
    """Tensors a level's optimizer keeps per parameter: Adam(W)'s two moments, SGD's momentum buffer if any."""
    if level.optimizer == "sgd":
        return 1 if level.momentum else 0
    return 2


# -- the quantizer, from its config -----------------------------------------------------------------------------

def quantizer_size(q: QuantizerConfig) -> tuple[int, int]:
    """(parameters, buffer bytes) of the quantizer ``q`` describes, as its kind counts them (``Quantizer.size``)."""
    return QUANTIZERS[q.kind].size(q)


# -- the network, on the meta device ----------------------------------------------------------------------------

@dataclass
class NetworkSize:
    parameters: int
    buffer_bytes: int
    activations: int  # numbers the encoder's and decoder's forwards make for one image
    positions: int  # latent vectors of one image (height x width of the encoder's output)


# The checks measure the encoder and decoder only: no LPIPS network (loss.perceptual_weight) is loaded for them.
_NO_PERCEPTUAL = LossConfig()


def _check_geometry(cfg: Config, channels: int, image_size: int, num_classes: int) -> None:
    """The layers fit the images and a reconstruction comes back at their size. Tried on a narrow copy of the
    network: sizes do not depend on widths, and so the check costs the same for any width."""
    narrow = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, hidden_channels=2, res_channels=1, num_res_blocks=0, z_channels=None,
                                       norm_groups=1),
        quantizer=QuantizerConfig(num_codes=1, dim=1), loss=_NO_PERCEPTUAL)
    with torch.device("meta"):
        model = build_model(narrow, channels, num_classes, image_size).eval()
        if not model.task.outputs_images:
            return  # the classifier pools its features to 1 x 1, whatever the image size
        images = torch.empty(1, channels, image_size, image_size)
        try:
            fits = model.decoder(model.encoder(images)).shape == images.shape
        except RuntimeError:  # a stride-2 stage got a side smaller than its kernel
            fits = False
    if not fits:
        kind = MODELS[cfg.model.kind]
        stages = kind.downsample(cfg.model)
        if stages is None:
            raise UserError(f"model.kind: {quote(cfg.model.kind)} does not fit the {image_size}-px images of data set "
                            f"{quote(cfg.data.name)}: its decoder returns another size")
        halvings = (image_size & -image_size).bit_length() - 1  # how often the side halves evenly
        raise UserError(f"{kind.downsample_key}: {stages} stride-2 stages do not fit the {image_size}-px images of "
                        f"data set {quote(cfg.data.name)}: the side must be divisible by 2^{stages}, and {image_size} "
                        f"is divisible by 2^{halvings} at most")


def network_size(cfg: Config, channels: int, image_size: int, num_classes: int) -> NetworkSize:
    """Size of the encoder and decoder. A residual block after the first (the VQ-GAN's first of a level changes
    its width) keeps its input's shape, so each adds the same parameters and activations: the network is measured
    with 1 and 2 blocks and extrapolated (a billion blocks would take hours to build, even on the meta device)."""
    try:
        one = _measure(cfg, channels, image_size, num_classes, num_res_blocks=1)
        two = _measure(cfg, channels, image_size, num_classes, num_res_blocks=2)
    except RuntimeError:  # a tensor of 2^63 bytes or more, which torch cannot even describe
        key = _largest_key(cfg, _network_keys(cfg))
        raise UserError(f"{key}: {_value(cfg, key)} makes a layer of 2^63 bytes or more, far beyond any memory; "
                        f"lower {key}") from None
    blocks = cfg.model.num_res_blocks
    return NetworkSize(*(first + (blocks - 1) * (second - first)
                         for first, second in zip(dataclasses.astuple(one), dataclasses.astuple(two))))


def _measure(cfg: Config, channels: int, image_size: int, num_classes: int, num_res_blocks: int) -> NetworkSize:
    # A one-code stand-in quantizer: the configured one may be too large to build even on the meta device
    # (RunningAffine lists its codes in Python); quantizer_size accounts for it.
    stand_in = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_res_blocks=num_res_blocks),
                                   quantizer=QuantizerConfig(num_codes=1, dim=cfg.quantizer.dim), loss=_NO_PERCEPTUAL)
    with torch.device("meta"):
        # eval: BatchNorm in training mode refuses a batch of one image with 1 x 1 features.
        model = build_model(stand_in, channels, num_classes, image_size).eval()
        networks = nn.ModuleList([model.encoder, model.decoder])
        counter = _OutputCounter(networks)
        z_e = model.encoder(torch.empty(1, channels, image_size, image_size))
        model.decoder(z_e)
    return NetworkSize(
        parameters=sum(p.numel() for p in networks.parameters()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in networks.buffers()),
        activations=counter.numbers,
        positions=z_e[0, 0].numel(),
    )


class _OutputCounter:
    """Counts the numbers the leaf modules of ``module`` make in forwards (an output that is its input, as
    nn.Identity's, is no new memory)."""

    def __init__(self, module: nn.Module):
        self.numbers = 0
        for leaf in module.modules():
            if next(leaf.children(), None) is None:
                leaf.register_forward_hook(self._count)

    def _count(self, module, inputs, output):
        if not any(output is x for x in inputs):
            self.numbers += output.numel()


# -- which key to lower -----------------------------------------------------------------------------------------

def _dominant_key(cfg: Config, estimate: MemoryEstimate) -> str:
    part = max(("codebook", "network", "activations"), key=lambda name: getattr(estimate, name))
    if part == "activations":
        return "data.batch_size"
    if part == "codebook":
        return _largest_key(cfg, ("quantizer.num_codes", "quantizer.dim", "quantizer.codebook_mlp"))
    return _largest_key(cfg, _network_keys(cfg))


def _network_keys(cfg: Config) -> tuple[str, ...]:
    """The keys that set the encoder's and decoder's widths (ResNet-18's own widths are fixed)."""
    return MODELS[cfg.model.kind].width_keys


def _largest_key(cfg: Config, keys: tuple[str, ...]) -> str:
    return max(keys, key=lambda key: _value(cfg, key) or 0)  # a null width (model.z_channels) is another key's


def _value(cfg: Config, key: str):
    value = functools.reduce(getattr, key.split("."), cfg)
    return max(value, default=0) if isinstance(value, list) else value  # a list of widths: its widest


def _gib(size: int) -> str:
    return f"{size / 2**30:.3g} GiB"
