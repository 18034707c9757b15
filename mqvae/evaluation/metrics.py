"""Evaluation metrics of MQ-VAE §5.2: codebook perplexity, gradient estimation gap, FID / IS / LPIPS, and
classification's macro F1.

Pretrained networks (Inception for FID/IS, AlexNet for LPIPS) are loaded from torch hub's local cache
(``cached_weights``) and fetched only when asked (``download_weights``); LPIPS's AlexNet cannot take images
under ``LPIPS_MIN_SIDE`` px. A metric that is not measured is ``None`` together with a one-line reason; no
number is ever substituted.
"""

import importlib
import io
import math
import os
import pickle
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

import torch
import torch.hub
from torch import Tensor, nn

from mqvae.errors import UserError
from mqvae.runtime import distributed

# The image-quality networks come from torchmetrics and torchvision, whose imports take seconds (most of what a run
# imports before it reads its config): they are imported on first use, so that a config's typo answers at once.
# Each is a module attribute all the same (``metrics.FrechetInceptionDistance``), which tests replace.
_LAZY = {
    "_lpips_update": ("torchmetrics.functional.image.lpips", "_lpips_update"),
    "LpipsNetwork": ("torchmetrics.functional.image.lpips", "_NoTrainLpips"),  # LPIPS's AlexNet with its linear heads
    "FrechetInceptionDistance": ("torchmetrics.image.fid", "FrechetInceptionDistance"),
    "InceptionScore": ("torchmetrics.image.inception", "InceptionScore"),
    "AlexNet_Weights": ("torchvision.models", "AlexNet_Weights"),
    "VGG16_Weights": ("torchvision.models", "VGG16_Weights"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = globals()[name] = getattr(importlib.import_module(module), attribute)
    return value


def _lazy(name: str):
    """The attribute ``name`` of this module, imported on first use (or as a test replaced it)."""
    return getattr(sys.modules[__name__], name)

# The metrics ImageQuality computes, each with its "<name>_reason".
IMAGE_QUALITY = ("fid", "is", "lpips")

# Factors by which MQ-VAE reports these columns (Table 3, also Tables 1/4/5: "LPIPS (10^-1)",
# "MSE (10^-3)", "Δgap (10^-5)"): a reported 1.23 in the MSE column means 1.23e-3.
SCALES = {"mse": 1e-3, "lpips": 1e-1, "gradient_gap": 1e-5}


def perplexity(counts: Tensor) -> float:
    """Codebook perplexity 2^H(p) (MQ-VAE §5.2), H in bits, p the empirical code distribution.

    Ranges from 1 (one code used) to K (all K codes used equally often). The float64 value over the exact
    histogram; training logs a batch's, a float32 tensor on the device (``quantizers.batch_perplexity``).
    """
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        raise ValueError("perplexity of an empty code histogram is undefined")
    p = counts[counts > 0] / total  # unused codes contribute 0·log 0 = 0
    entropy_bits = -(p * torch.log2(p)).sum()
    return float(2.0**entropy_bits)


def active_codes(counts: Tensor) -> int:
    """Number of codewords selected at least once."""
    return int((counts > 0).sum())


def code_rate(counts: Tensor, groups: int) -> dict:
    """What a spatial position's codes carry, so that rows with other code layouts are not compared silently:
    ``rate_bits``, the bits a position's codes can hold (G·log2(K/G) for G groups of K/G codes each: 7 for 128
    codes, 12 for 2 groups of 64); ``entropy_bits``, the bits they carry over the test set when each group is coded
    alone (Σ_g log2 of group g's perplexity; equal to log2(perplexity) with one group); and the perplexity and
    active codes of each group, whose codes are ``counts``' consecutive slices. ``perplexity`` and
    ``active_codes`` count the whole codebook."""
    per_group = counts.reshape(groups, -1)
    perplexities = [perplexity(c) if c.sum() > 0 else None for c in per_group]
    return {"rate_bits": groups * math.log2(per_group.shape[1]),
            "entropy_bits": sum(math.log2(p) for p in perplexities if p is not None),
            "perplexity_per_group": perplexities,
            "active_codes_per_group": [active_codes(c) for c in per_group]}


def macro_f1(predictions: Tensor, labels: Tensor) -> float:
    """Unweighted mean over classes present in labels or predictions of 2PR/(P+R)
    (sklearn's ``f1_score(average="macro")``)."""
    scores = []
    for c in torch.unique(torch.cat([predictions, labels])):
        tp = ((predictions == c) & (labels == c)).sum().item()
        fp = ((predictions == c) & (labels != c)).sum().item()
        fn = ((predictions != c) & (labels == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


def gradient_gap(
    decode: Callable[[Tensor], Tensor], task_loss: Callable[[Tensor], Tensor], z_e: Tensor, z_q: Tensor
) -> Tensor:
    """Gradient estimation gap Δgap of one batch (Huh et al. Eq. 14, MQ-VAE §5.2).

    Δgap = ‖∂L_task(G(z_e))/∂F(x) − ∂L_task(G(z_q))/∂F(x)‖₂, with F(x) = z_e the encoder output. The first
    term is the gradient of the model without quantization; the second is what the straight-through
    estimator z_e + (z_q − z_e).detach() hands the encoder, i.e. the loss gradient evaluated at z_q.
    The norm is taken over the whole batch's gradient tensor; callers average these per-batch values over
    the test set. Huh et al. App. A.3 instead sums squared per-layer errors over encoder parameters; we
    follow Eq. 14 as MQ-VAE states it, which is measured at the encoder output.

    The value scales with ``task_loss``'s reduction (a mean-reduced MSE divides by the element count), so
    pass the training task loss to compare against the papers (MQ-VAE reports it ×1e-5, see ``SCALES``).
    ``decode`` runs twice; a decoder in train mode would update BatchNorm statistics twice.
    Parameters' ``.grad`` are left untouched: gradients are taken only w.r.t. the latents.
    """
    # Evaluation loops usually run under no_grad; Δgap needs autograd regardless.
    with torch.enable_grad():
        z_cont = z_e.detach().requires_grad_(True)
        (grad_cont,) = torch.autograd.grad(task_loss(decode(z_cont)), z_cont)
        z_ste = z_q.detach().requires_grad_(True)
        (grad_ste,) = torch.autograd.grad(task_loss(decode(z_ste)), z_ste)
    return torch.linalg.vector_norm(grad_cont - grad_ste)


# LPIPS runs at the images' own size, as torchmetrics' LearnedPerceptualImagePatchSimilarity (which the
# MQ-VAE paper uses) does: no resizing. Its AlexNet needs a side of at least 31 px: conv1 (11×11, stride 4,
# padding 2) gives floor((s - 7) / 4) + 1 per side, and the two 3×3 stride-2 max-pools (slices 2 and 3) need
# 7 -> 3 -> 1. At 28 px conv1 gives 6, the pools 2 and then nothing; at 16 px 3, 1, nothing; at 8 px 1 and
# the first pool already fails. torch raises "Output size is too small" there.
LPIPS_MIN_SIDE = 31


def _lpips_too_small(height: int, width: int) -> str:
    return (f"LPIPS AlexNet cannot take {height}x{width} images (torchmetrics runs it at the images' own size; "
            f"its 11x11/4 conv1 and two 3x3/2 max-pools need a side of at least {LPIPS_MIN_SIDE} px, torch raises "
            "'Output size is too small'); not resized, so not measured")


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}"


def cached_weights(url: str) -> Path:
    """The file that ``torch.hub.load_state_dict_from_url(url)`` loads instead of downloading:
    ``<torch.hub.get_dir()>/checkpoints/<the URL's file name>`` (``$TORCH_HOME/hub/checkpoints``, by default
    ``~/.cache/torch/hub/checkpoints``). torchvision's AlexNet and torch-fidelity's Inception both load their
    weights through that function with its default folder."""
    return Path(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def inception_url() -> str:
    """The weights of the Inception that torchmetrics' FID and IS build (torch-fidelity's own constant, so the
    file name follows the installed version). ModuleNotFoundError without torch-fidelity."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"{exc} (the image extra: pip install torch-fidelity)", name=exc.name) from None
    return URL_INCEPTION_V3


def alexnet_url() -> str:
    """The weights of the AlexNet that torchmetrics' LPIPS builds (torchvision's ``AlexNet_Weights.DEFAULT``)."""
    return _lazy("AlexNet_Weights").DEFAULT.url


# What loading a network's weights raises: URLError (no network) and cache errors are OSError; a truncated or
# foreign file in the cache is EOFError or UnpicklingError, one of another shape RuntimeError.
_LOAD_ERRORS = (OSError, RuntimeError, EOFError, pickle.UnpicklingError)


def _build_pretrained(factory: Callable[[], nn.Module], what: str, weights_url: Callable[[], str],
                      download_weights: bool) -> tuple[Optional[nn.Module], Optional[str]]:
    """Construct a metric whose pretrained network may be unavailable: (metric, None) or (None, reason).

    Weights missing from the local cache are fetched only with ``download_weights``; without it the metric is
    not built, so nothing reaches for the network. torchmetrics 1.9 loads all weights in the constructor, so
    only construction is guarded; errors in ``update`` are bugs and propagate.
    """
    try:
        path = cached_weights(weights_url())
    except ModuleNotFoundError as exc:
        return None, f"{what} unavailable, optional package missing: {_one_line(exc)}"
    cached = path.is_file()
    if not cached and not download_weights:
        return None, f"{what} weights not in the local cache ({path}); set eval.download_weights: true to fetch them"
    try:
        # torch.hub prints "Downloading: ..." on stdout and its progress bar on stderr; the warning below says it.
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            metric = factory()
    except ModuleNotFoundError as exc:
        return None, f"{what} unavailable, optional package missing: {_one_line(exc)}"
    except _LOAD_ERRORS as exc:
        where = f"in the local cache ({path}) do not load" if cached else f"not cached ({path}) and not downloadable"
        return None, f"{what} weights {where}: {_one_line(exc)}"
    if not cached:
        warnings.warn(f"{what} weights downloaded to {path}", stacklevel=2)
    return metric, None


def vgg16_url() -> str:
    """The weights of the VGG-16 that LPIPS-VGG builds (torchvision's ``VGG16_Weights.DEFAULT``)."""
    return _lazy("VGG16_Weights").DEFAULT.url


def lpips_vgg(download_weights: bool) -> tuple[Optional[nn.Module], Optional[str]]:
    """LPIPS-VGG (torchmetrics' network: VGG-16 features and the learned linear heads shipped with torchmetrics), or
    None and the reason it cannot be built (``_build_pretrained``). Tests replace this function with a stand-in
    backbone (``_lpips_with_backbone(..., net="vgg")``)."""
    return _build_pretrained(lambda: _lazy("LpipsNetwork")(net="vgg"), "LPIPS VGG-16", vgg16_url, download_weights)


class PerceptualDistance(nn.Module):
    """The perceptual loss of VQ-GAN (Esser et al. 2021; MQ-GAN's, ``loss.perceptual_weight``): LPIPS between a
    reconstruction and its input, one distance per image, differentiable in both. LPIPS takes images in [-1, 1]:
    ``signed`` says the data already are (``data.range``), else [0, 1] images are mapped there. Grey images are
    repeated over the 3 channels LPIPS needs, as the image-quality metric does. The network is frozen."""

    def __init__(self, network: nn.Module, signed: bool):
        super().__init__()
        self.network = network.eval().requires_grad_(False)  # (torchmetrics' network stays in eval mode: dropout)
        self.signed = signed

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        if output.shape[1] == 1:
            output, target = output.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        return self.network(output, target, normalize=not self.signed).reshape(-1)


def perceptual_distance(weight: float, signed: bool, download_weights: bool) -> PerceptualDistance:
    """LPIPS-VGG for ``loss.perceptual_weight``, or one line (a UserError) saying which weights are missing and
    where to put them: before anything is written, since a run folder without its loss would be useless."""
    network, reason = lpips_vgg(download_weights)
    if network is None:
        path = cached_weights(vgg16_url())
        raise UserError(f"loss.perceptual_weight: {weight} needs LPIPS's VGG-16 ({reason}); put {path.name} in "
                        f"{path.parent}, or set eval.download_weights: true, or loss.perceptual_weight: 0")
    return PerceptualDistance(network, signed)


def _lpips_with_backbone(backbone: nn.Module, net: str = "alex") -> nn.Module:
    """LPIPS (AlexNet variant, or ``net``'s) whose feature backbone is ``backbone``.

    torchmetrics' LearnedPerceptualImagePatchSimilarity accepts no network and downloads AlexNet in its
    constructor, so the seam is its inner ``_NoTrainLpips`` (``LpipsNetwork`` here): built with a random
    AlexNet (no download), its learned linear heads loaded from the file shipped with torchmetrics, then
    ``.net`` replaced.
    ``backbone`` must map a scaled N×3×H×W batch to 5 feature maps with AlexNet's channel counts
    (64, 192, 384, 256, 256), because those heads are sized for AlexNet (VGG's: 64, 128, 256, 512, 512).
    """
    lpips = _lazy("LpipsNetwork")(net=net, pnet_rand=True)
    lpips.net = backbone
    return lpips.eval()


class ImageQuality:
    """FID, IS and LPIPS between real and reconstructed images, accumulated over a test set.

    Stand-in networks (for tests, or machines without the pretrained weights) replace the pretrained ones:
    ``fid_feature`` / ``is_feature`` are passed to torchmetrics as ``feature=<module>`` and receive float
    N×3×H×W images in [0, 1] (FID features N×d, IS logits N×classes); ``lpips_net`` replaces LPIPS's
    AlexNet backbone (see ``_lpips_with_backbone``). IS is computed on the reconstructions only, as MQ-VAE
    Table 3 evaluates the quality of reconstructed images.

    Every metric sees the images at their own size (Inception resizes to 299 px inside torchmetrics). LPIPS
    is ``None`` for images with a side under ``LPIPS_MIN_SIDE``, with a stand-in backbone too: it stands in
    for AlexNet, so a test run gives the same nulls as a real one. The pretrained networks are loaded from
    torch hub's local cache, and fetched into it only with ``download_weights`` (``_build_pretrained``).
    """

    def __init__(
        self,
        device,
        *,
        fid_feature: Optional[nn.Module] = None,
        is_feature: Optional[nn.Module] = None,
        lpips_net: Optional[nn.Module] = None,
        download_weights: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.reasons: dict[str, Optional[str]] = {}

        # With normalize=True the default Inception takes [0, 1] floats (it casts to uint8 and resizes
        # to 299 itself); a custom FID module then gets the floats unchanged.
        if fid_feature is None:
            self._fid, self.reasons["fid"] = _build_pretrained(
                lambda: _lazy("FrechetInceptionDistance")(feature=2048, normalize=True), "FID Inception", inception_url,
                download_weights)
        else:
            self._fid, self.reasons["fid"] = _lazy("FrechetInceptionDistance")(feature=fid_feature, normalize=True), None

        # InceptionScore casts to uint8 whenever normalize=True, custom module or not; a stand-in gets
        # normalize=False so that it sees the same [0, 1] floats as the FID stand-in.
        if is_feature is None:
            self._is, self.reasons["is"] = _build_pretrained(
                lambda: _lazy("InceptionScore")(normalize=True), "IS Inception", inception_url, download_weights)
        else:
            self._is, self.reasons["is"] = _lazy("InceptionScore")(feature=is_feature, normalize=False), None

        # AlexNet is built at the first batch, once its size shows that AlexNet can take it: no weights are loaded,
        # or fetched, for images LPIPS cannot measure anyway (digits, MNIST).
        self._lpips, self.reasons["lpips"], self._build_lpips = None, None, None
        if lpips_net is None:
            # The same network LearnedPerceptualImagePatchSimilarity(net_type="alex") builds.
            self._build_lpips = lambda: _build_pretrained(lambda: _lazy("LpipsNetwork")(net="alex"), "LPIPS AlexNet",
                                                          alexnet_url, download_weights)
        else:
            self._lpips = _lpips_with_backbone(lpips_net)

        for metric in (self._fid, self._is, self._lpips):
            if metric is not None:
                metric.to(self.device)
        self._lpips_sum = 0.0
        self._num_pairs = 0

    def _as_rgb(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected N×1×H×W or N×3×H×W images, got shape {tuple(images.shape)}")
        images = images.to(self.device, torch.float32)
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    @torch.no_grad()
    def update(self, real: Tensor, fake: Tensor) -> None:
        """Add a batch of real images and their reconstructions, N×C×H×W in [0, 1], C ∈ {1, 3}."""
        if real.min() < 0 or real.max() > 1:
            raise ValueError(f"real images must lie in [0, 1], got [{float(real.min())}, {float(real.max())}]")
        real = self._as_rgb(real)
        # Decoder outputs are unbounded; evaluate the image as it would be displayed. Without the clamp
        # the uint8 cast inside torchmetrics would wrap 1.01 around to a dark pixel.
        fake = self._as_rgb(fake).clamp(0, 1)
        if self._fid is not None:
            self._fid.update(real, real=True)
            self._fid.update(fake, real=False)
        if self._is is not None:
            self._is.update(fake)
        if min(real.shape[-2:]) < LPIPS_MIN_SIDE:
            # Decisive even where the weights are missing: with them, the value would not exist either.
            self._lpips, self.reasons["lpips"], self._build_lpips = None, _lpips_too_small(*real.shape[-2:]), None
        elif self._build_lpips is not None:
            self._lpips, self.reasons["lpips"] = self._build_lpips()
            self._build_lpips = None
            if self._lpips is not None:
                self._lpips.to(self.device)
        if self._lpips is not None:
            scores = _lazy("_lpips_update")(real, fake, net=self._lpips, normalize=True)
            self._lpips_sum += float(scores.double().sum())
        self._num_pairs += real.shape[0]

    def compute(self) -> dict:
        """{"fid", "is", "lpips"}: float or None, each with its "<name>_reason" (None when measured).

        IS splits the images in a random order (torchmetrics), so it varies slightly with the torch seed.
        """
        # Data-parallel: the ranks' pairs together (torchmetrics gathers FID's and IS's states itself in compute).
        self._lpips_sum, self._num_pairs = distributed.sum_numbers(self._lpips_sum, self._num_pairs)
        if self._num_pairs == 0:
            raise ValueError("ImageQuality.compute() called before any update()")
        values = {  # in IMAGE_QUALITY's order
            "fid": None if self._fid is None else float(self._fid.compute()),
            "is": None if self._is is None else float(self._is.compute()[0]),  # (mean, std) over splits
            "lpips": None if self._lpips is None else self._lpips_sum / self._num_pairs,
        }
        out = {}
        for name, value in values.items():
            out[name] = value
            out[f"{name}_reason"] = self.reasons[name]
        return out
