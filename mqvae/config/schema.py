"""Experiment configuration: YAML -> typed dataclasses, validated once at load.

Every key of a config file is a field below; the field name is also the
attribute the code reads and the key the logs write (one concept, one name).
Validation happens here and only here, so the rest of the toolkit can trust
its inputs. Any problem is a ``UserError`` whose one-line message names the
file, the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import stat
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from mqvae.config import plugins
from mqvae.errors import UserError, cut, quote, quote_key
from mqvae import registry
from mqvae.registry import did_you_mean


def spec(default=dataclasses.MISSING, *, choices=None, min=None, max=None, above=None, factory=None):
    """A dataclass field with its allowed values: ``choices``, ``min``/``max`` (inclusive), ``above`` (exclusive)."""
    meta = {"choices": choices, "min": min, "max": max, "above": above}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = "data"
    download: bool = False
    batch_size: int = spec(64, min=1)
    num_workers: int = spec(0, min=0)
    # Fraction of the training split held out for levels with ``data: holdout``.
    holdout_fraction: float = spec(0.1, above=0.0, max=0.9)
    # Side of the square images the network sees; null: the data set's own (image_folder 64, celeba 64, the others
    # as stored). image_folder and celeba are resized (shorter side; celeba after its central 140-px face crop) and
    # cropped to it; the sets stored at one size (digits, mnist, fashion_mnist, cifar10, cifar100, svhn) refuse
    # another value when the data is loaded (mqvae.data.datasets.shaped). MQ-GAN (MQ-VAE App. G): 256.
    image_size: Optional[int] = spec(None, min=1)
    # Training images (never test images) cropped at a random place instead of the center (image_folder, celeba), as
    # the authors' MQ-GAN code does (resize of the shorter side, then albumentations' RandomCrop). Each item's crop is
    # a pure function of its batch stream's seed, the epoch and the item's index (mqvae.data.loader.BatchStream), so
    # runs repeat and resume exactly, with any num_workers and any number of data-parallel ranks.
    random_crop: bool = False
    # The interval the network sees pixels in: [0, 1] (ToTensor's scaling, the paper's App. I) or [-1, 1] (2x - 1, the
    # authors' MQ-GAN code). The training loss is in the range's units: an MSE on [-1, 1] is 4 times the same error on
    # [0, 1]. Metrics (test_mse, FID, IS, LPIPS) and pictures see the data set's own [0, 1] pixels whatever the range,
    # so that runs with either range compare (mqvae.data.to_pixels).
    range: list[float] = spec(factory=lambda: [0.0, 1.0], choices=[[0.0, 1.0], [-1.0, 1.0]])
    # Where training batches are gathered (mqvae.data.loader: place, BatchStream). true: the training set lives on the
    # device as one tensor per field and each batch is gathered there by index; a set not held as tensors (a
    # TensorDataset: digits, mnist, fashion_mnist, a prior's code maps; not cifar10, cifar100, svhn, image_folder,
    # celeba, nor any random_crop set, read item by item) is refused with one line, as is one larger than the CUDA
    # device's free memory. auto: true on a CUDA device for a tensor set of at most a quarter of its free memory
    # (loader.ON_DEVICE_SHARE), else false. false: batches are gathered on the host and, on CUDA, copied through pinned
    # memory without blocking, one batch ahead. The batches, their order and a resume are the same either way, so
    # results do not change. On the CPU the host is the device: every value gives the same batches (true still
    # refuses a set that is not a tensor set).
    on_device: bool | str = spec("auto", choices=["auto", True, False])


@dataclass
class ModelConfig:
    # A registered model kind (mqvae.registry.MODELS). ``vqvae``: van den Oord et al.'s backbone for reconstruction;
    # ``vqgan``: Esser et al.'s VQ-GAN encoder-decoder (taming-transformers), MQ-GAN's backbone (MQ-VAE App. G);
    # ``resnet18``: torchvision ResNet-18 quantized after layer2 for classification (Huh §5.1). A key that the
    # kind does not read (its ModelKind.model_keys) is refused at load unless it keeps its default.
    kind: str = "vqvae"
    # The width of the first layers: the VQ-VAE's hidden width; the VQ-GAN's base width, taming's ``ch`` (one
    # concept, one name), each level's width being hidden_channels * ch_mult[level].
    hidden_channels: int = spec(64, min=1)
    # vqvae: the residual blocks' inner width.
    res_channels: int = spec(32, min=1)
    # Residual blocks: the VQ-VAE's after its stride-2 stages; the VQ-GAN's per level of the encoder (its decoder has
    # one more per level), taming's ``num_res_blocks``.
    num_res_blocks: int = spec(2, min=0)
    # vqvae: number of stride-2 convolutions in the encoder (and transposed ones in the decoder).
    downsample: int = spec(2, min=1, max=5)
    # vqvae: BatchNorm after its convolutions, or none.
    norm: str = spec("none", choices=["none", "batch"])
    # Data-parallel runs: BatchNorm on the statistics of the global batch (torch's SyncBatchNorm, CUDA only).
    sync_batch_norm: bool = False
    # vqgan: each level's width as a multiple of hidden_channels; a stride-2 stage between levels, so the latent's
    # side is the image's / 2^(len(ch_mult) - 1). The default is taming's f16 (MQ-GAN's); f8 is [1, 2, 2, 4].
    ch_mult: list[int] = spec(factory=lambda: [1, 1, 2, 2, 4])
    # vqgan: the feature-map sides (in pixels, the image's side halved once per level) at which each residual
    # block is followed by self-attention; the middle of each half always has one.
    attn_resolutions: list[int] = spec(factory=lambda: [16])
    # vqgan: channels of conv_out (encoder) and conv_in (decoder), taming's ``z_channels`` (256 in f16); null: the
    # code dim, quantizer.dim.
    z_channels: Optional[int] = spec(None, min=1)
    # vqgan: the 1x1 convolutions between z_channels and the code dim around the quantizer (taming's quant_conv and
    # post_quant_conv); false needs z_channels equal to quantizer.dim (or null).
    quant_conv: bool = True
    # vqgan: LayerNorm over the channels of each latent vector before the quantizer (after quant_conv; the authors'
    # MQ-GAN code applies it by default, as ``trailing_norm``), or none (taming's VQ-GAN).
    z_norm: str = spec("layer", choices=["none", "layer"])
    # vqgan: dropout inside each residual block (taming's, 0 in f8 and f16). Each forward draws new masks, so the
    # finite-difference passes of Eq. 13 would then differ by more than the perturbation.
    dropout: float = spec(0.0, min=0.0, max=1.0)
    # vqgan: GroupNorm's number of groups (taming's 32); it must divide every width hidden_channels * ch_mult[i].
    norm_groups: int = spec(32, min=1)


@dataclass
class QuantizerConfig:
    # A registered quantizer kind (mqvae.registry.QUANTIZERS): ``vq`` (nearest code, with Huh et al.'s options
    # below) or ``gumbel`` (Gumbel-VQ).
    kind: str = "vq"
    num_codes: int = spec(128, min=1)
    dim: int = spec(16, min=1)
    # MQ-VAE Eq. 6: L = L_task + beta * L_commit + codebook_weight * L_codebook (both terms are MSEs).
    # Huh et al.'s Eq. 8-10, L_task + alpha * [(1 - b) * d(z_e, sg[z_q]) + b * d(sg[z_e], z_q)] (their b
    # weights the codebook side), is beta = alpha * (1 - b), codebook_weight = alpha * b; e.g. their
    # ResNet-18 alpha = 5, b = 0.98 -> beta = 0.1, codebook_weight = 4.9. (With their d = ½‖·‖² summed
    # over D instead of an MSE, multiply both by D/2.)
    beta: float = spec(0.1, min=0.0)
    codebook_weight: float = spec(1.0, min=0.0)
    # Huh et al.'s synchronized update (Eq. 21): the codebook also receives sync_nu * dL_task/dz_q.
    sync_nu: float = spec(0.0, min=0.0)
    # Huh et al.'s affine re-parameterization (§4.1): none, learned scale/bias, or running statistics.
    affine: str = spec("none", choices=["none", "learned", "ema"])
    # r of the learned map, Huh A.1: scale = 1 + r*s, bias = r*t, with s, t trained at their optimizer group's lr;
    # the scale's step is lr*r^2 times its gradient under SGD, about lr*r under Adam (Huh Tables 4-6 "affine lr scale").
    affine_lr: float = spec(1.0, above=0.0)
    affine_groups: int = spec(1, min=1)
    # Momentum m of the running-statistics variant, Huh Eq. 38-45 (new = m * batch + (1 - m) * old).
    affine_momentum: float = spec(0.1, min=0.0, max=1.0)
    # Dead-code (LRU) replacement: a code idle for replace_freq iterations is re-seeded (0 = off).
    replace_freq: int = spec(0, min=0)
    # k-means init of the codes from encoder outputs before training (Huh §3.2; MQ-VAE §5.1 uses it for every
    # model). A Gumbel-VQ config turns it off: its codes are not found by distance.
    kmeans_init: bool = True
    kmeans_iters: int = spec(10, min=0)
    # Steps of the encoder-decoder without its quantizer (z_q = z_e) before the k-means fit, so that the codes are
    # fitted where the encoder's outputs will be; with 0 they are fitted on the untrained encoder, whose outputs
    # leave them in the first few steps (engines/experiment.py, warm_up_encoder_decoder). Needs kmeans_init.
    kmeans_warmup: int = spec(100, min=0)
    # l2-normalized inputs and codes, cosine search, losses on the normalized vectors (Yu et al.; Huh Table 3).
    l2: bool = False
    # Grouped latents: each D-vector is split into `groups` sub-vectors of dim/groups, each quantized against
    # its own slice of num_codes/groups codes (num_codes counts all codes; indices are global).
    groups: int = spec(1, min=1)
    # The hyper-net codebook of the authors' MQ-GAN code (t2ance/MQVAE, hyper_net_type mlp-tanh): the hidden widths of
    # an MLP (tanh between layers) that each stored vector passes through, so the codes the search and the losses use
    # are MLP(codebook), the codebook being the MLP's input embedding (N(0, 1) at the start, as their nn.Embedding).
    # One MLP for every code and latent group; the affine map and l2 come after it. [] = no MLP. Needs
    # kmeans_init: false and replace_freq: 0 (both write chosen codes).
    codebook_mlp: list[int] = spec(factory=list, min=1)
    # Nearest-neighbour search: distance entries per chunk, and the matmul precision (Huh A.1).
    # Most distance entries the nearest-code search holds at once; null = the device's default (search.py).
    search_chunk: Optional[int] = spec(None, min=1)
    search_precision: str = spec("fp32", choices=["fp32", "fp16", "bf16"])
    # Gumbel-VQ (Karpathy): softmax temperature and weight of the KL-to-uniform term.
    gumbel_temperature: float = spec(1.0, above=0.0)
    # The temperature after the anneal: tau falls geometrically from gumbel_temperature to it over the first
    # gumbel_anneal_iters training iterations (null: all of train.iters) and stays there (Jang et al. 2017 anneal
    # tau exponentially to a floor of 0.5; Esser et al.'s taming-transformers anneal it too).
    # null = a constant tau (Karpathy's deep-vector-quantization).
    gumbel_temperature_final: Optional[float] = spec(None, above=0.0)
    gumbel_anneal_iters: Optional[int] = spec(None, min=1)
    gumbel_kl_weight: float = spec(5e-4, min=0.0)
    # Training samples: false = the relaxed sample weights the codebook (Karpathy's default); true = the sampled
    # code's one-hot forward, the relaxed sample's gradient backward (Jang et al. 2017's straight-through
    # Gumbel-softmax; taming-transformers' default). Evaluation takes the most likely code either way.
    gumbel_straight_through: bool = False


@dataclass
class LossConfig:
    # L_task of a reconstruction (Eq. 6): the per-pixel mse (MQ-VAE) or the mean l1 (VQ-GAN; the authors' MQ-GAN).
    reconstruction: str = spec("mse", choices=["mse", "l1"])
    # Weight of LPIPS-VGG (Zhang et al. 2018) between the input and its reconstruction, added to L_task (VQ-GAN's
    # perceptual loss; the authors' rate_p). 0: none, and nothing is loaded. Its pretrained VGG-16 comes from torch
    # hub's local cache (eval.download_weights fetches it); a run that lacks it stops before training.
    perceptual_weight: float = spec(0.0, min=0.0)


@dataclass
class LevelConfig:
    name: str = spec(dataclasses.MISSING)
    # Name of a registered Problem class (mqvae.registry.PROBLEMS), e.g. Codebook, AutoEncoder, VQVAE.
    problem: str = spec(dataclasses.MISSING)
    # The level kind's own settings: a mapping in the file, its class's Params dataclass once validated.
    params: dict = spec(factory=dict)
    # A registered optimizer (mqvae.method.optim.OPTIMIZERS): adam, adamw, sgd, or a user's.
    optimizer: str = "adamw"
    lr: float = spec(2e-3, above=0.0)
    weight_decay: float = spec(1e-4, min=0.0)
    momentum: float = spec(0.0, min=0.0, max=1.0)
    # Adam and AdamW's (beta1, beta2) and eps; null: torch's (0.9, 0.999) and 1e-8. The authors' MQ-GAN code uses
    # betas (0.5, 0.9) and eps 1e-7 for its encoder-decoder.
    betas: Optional[list[float]] = None
    eps: Optional[float] = spec(None, above=0.0)
    # A registered schedule (mqvae.method.optim.SCHEDULERS): constant, cosine, warmup_cosine, or a user's.
    scheduler: str = "cosine"
    warmup_ratio: float = spec(0.1, min=0.0, max=1.0)
    # The lr cosine and warmup_cosine anneal to (the authors' min_lr), instead of 0.
    min_lr: float = spec(0.0, min=0.0)
    grad_clip: float = spec(0.0, min=0.0)
    # Betty's gradient_accumulation: the level's gradients (and an upper level's hypergradients) are averaged over
    # this many of its steps before each optimizer step. The authors' MQ-GAN runs 4 on both levels.
    grad_accumulation: int = spec(1, min=1)
    # Names of the levels directly below this one (Betty's u2l edges; l2u is their reverse).
    lower: list[str] = spec(factory=list)
    # Which batches the level trains on: its own draw from the training split, the batch of the
    # level below it (MQ-VAE uses one data set for both levels, §4.1), or a held-out split.
    data: str = spec("auto", choices=["auto", "train", "shared", "holdout"])


@dataclass
class HypergradientConfig:
    # mqvae: Eq. 13 as written; direct: no implicit term; the rest are Betty's own methods.
    # Any name registered with mqvae.method.hypergradients.register_hypergradient (checked in _validate).
    type: str = "mqvae"
    # Eq. 10's xi; null means the lower level's learning rate (the paper's choice). 0 = alternated optimization.
    xi: Optional[float] = spec(None, min=0.0)
    # Finite-difference radius: eps = alpha / ||v|| (Eq. 13, as in DARTS).
    alpha: float = spec(0.01, above=0.0)
    # Algorithm 1 lines 3-5: undo the tentative lower step and redo it with the updated codebook.
    roll_back: bool = False
    # Alternated optimization with k inner steps (Huh Table 10; needs xi = 0): per iteration the upper level (the
    # codebook) takes k optimizer steps, the i-th on the i-th of k equal sub-batches, before the lower level's one
    # step on the whole batch. 1 is Huh Eq. 17-18 as written.
    inner_steps: int = spec(1, min=1)
    # MQ-VAE‡ (App. E, Table 7; policy prediction, Zhang & Lesser 2010): on a two-level graph, each side predicts the
    # other's next state from the same current state and steps against that prediction. The upper level (the
    # codebook) takes MQ-VAE's step: direct + Eq. 13 implicit term through the lower level's tentative step. The
    # lower level (encoder-decoder) takes MQ-VAE†'s: its gradient at the upper level's tentative step plus the
    # Eq. 13 implicit term through that step. Both tentative steps are then undone and both real steps start from
    # the same state. Each side's xi is the other side's tentative-step lr (xi: null) or the value given.
    mutual: bool = False
    # MQ-VAE §4.2 ("multiple steps can be unrolled"): the lower level takes k steps, each on its own batch, between
    # two steps of the level above it, and the upper level's hypergradient looks through all k (the direct term at
    # the k-th iterate, the implicit term by Eq. 13's finite difference at each step, recursively: the DARTS
    # recursion, mqvae.method.hypergradients.mqvae). train.iters counts the lower level's steps (Betty's
    # unroll_steps), so the upper level steps iters / k times. With roll_back the k steps are undone and redone with
    # the updated codebook on the same k batches; without it the lower level keeps them.
    unroll_steps: int = spec(1, min=1)


@dataclass
class TrainConfig:
    iters: int = spec(2000, min=1)
    log_every: int = spec(25, min=1)
    # Evaluate on the test set every eval_every iterations and at the last one, each a record in log.jsonl
    # (0 = only the final evaluation, in metrics.json).
    eval_every: int = spec(200, min=0)
    checkpoint_every: int = spec(500, min=0)


@dataclass
class EvalConfig:
    # FID / IS / LPIPS at the end of a run (MQ-VAE Table 3). auto: each where its pretrained weights are in torch
    # hub's local cache (null with the reason otherwise); off: not computed (null, reason "eval.image_quality: off").
    image_quality: str = spec("auto", choices=["auto", "off"])
    # Fetch missing weights into that cache. Off by default: a run never touches the network (an unreachable
    # host can hang a download attempt for minutes).
    download_weights: bool = False


@dataclass
class DistributedConfig:
    # torchrun's process group: nccl on CUDA, gloo on the CPU (auto), or either by name.
    backend: str = spec("auto", choices=["auto", "gloo", "nccl"])
    # Longest wait of a collective: a rank that died mid-step ends the others after this long.
    timeout_s: float = spec(120.0, above=0.0)


@dataclass
class PerfConfig:
    channels_last: bool = True
    cudnn_benchmark: bool = True
    bf16: bool = False
    compile: bool = False
    # The training iteration captured once as CUDA graphs and replayed (engines.graphs): CUDA only, refused on the
    # CPU with one line. Quantizer maintenance, logging, evaluation and checkpoints stay outside the graphs.
    cuda_graphs: bool = False


@dataclass
class LoggingConfig:
    # TensorBoard event files in the run folder: log.jsonl's numbers and the pictures at evaluation steps (needs
    # the tensorboard extra; mqvae/io/tracking.py).
    tensorboard: bool = False


@dataclass
class PriorConfig:
    # A finished reconstruction run (its config.yaml, checkpoint.pt and metrics.json): the prior is a gated
    # PixelCNN (van den Oord et al. 2016) on its frozen codes (MQ-VAE Fig. 3). Empty: this config is no prior.
    # The run's model and quantizer sections become this config's (mqvae.method.prior.source_config).
    run: str = ""
    # Condition on the class label (the data set must have labels).
    class_conditional: bool = False
    channels: int = spec(64, min=1)
    layers: int = spec(8, min=1)
    # Side of the stacks' kernels (odd): the vertical stack covers kernel // 2 rows above, the horizontal stack
    # kernel // 2 columns to the left.
    kernel: int = spec(3, min=1)


@dataclass
class Config:
    # 32 bits: what a NumPy seed may hold. Torch takes 64, but a level's batch stream seeds torch with
    # seed * 100003 + epoch (loader.BatchStream), which must stay below 2^64; other streams get a 40-bit hash of
    # the seed (engines/build.py derived_seed), whatever its size.
    seed: int = spec(0, min=0, max=2**32 - 1)
    device: str = spec("auto", choices=["auto", "cpu", "cuda"])
    # torch's intra-op threads (torch.set_num_threads), set before anything runs; null: what torch picks (the cores,
    # or OMP_NUM_THREADS). The count changes each seed's numbers (float sums in another order); runs record it.
    threads: Optional[int] = spec(None, min=1)
    # Python modules imported before the rest of the config is read (mqvae.config.plugins), so that what they register
    # (levels, hypergradients, data sets, optimizers, schedules) can be named: module names, or .py file paths
    # (kept absolute). run.py --import adds to them; a resumed run or a sweep imports them again.
    imports: list[str] = spec(factory=list)
    data: DataConfig = spec(factory=DataConfig)
    model: ModelConfig = spec(factory=ModelConfig)
    quantizer: QuantizerConfig = spec(factory=QuantizerConfig)
    loss: LossConfig = spec(factory=LossConfig)
    levels: list[LevelConfig] = spec(factory=list)
    hypergradient: HypergradientConfig = spec(factory=HypergradientConfig)
    train: TrainConfig = spec(factory=TrainConfig)
    eval: EvalConfig = spec(factory=EvalConfig)
    perf: PerfConfig = spec(factory=PerfConfig)
    distributed: DistributedConfig = spec(factory=DistributedConfig)
    logging: LoggingConfig = spec(factory=LoggingConfig)
    prior: PriorConfig = spec(factory=PriorConfig)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with one-line errors.

# Torch keeps sizes, counts and seeds in 64 bits; a larger integer overflows deep inside it.
INT_LIMIT = 2**63


# How a message names the scalar types a key of several types takes.
_KIND_NAMES = {bool: "true or false", str: "a string", int: "an integer", float: "a number"}


def _shown(choice) -> str:
    """A choice as a config file writes it: YAML's true and false, not Python's True and False."""
    return str(choice).lower() if isinstance(choice, bool) else str(choice)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value, tp, where: str, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:
            return _convert(value, kinds[0], where, path)
        # A word or a boolean (data.on_device: auto, true or false): the value keeps its type, the choices decide.
        if type(value) not in kinds:
            raise UserError(f"{where}: {path}: expected {' or '.join(_KIND_NAMES[k] for k in kinds)}, got {quote(value)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{where}: {path}: expected a list, got {quote(value)}")
        return [_convert(v, item_tp, where, f"{path}.{_item_key(v, i)}") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: {path}: expected a mapping, got {quote(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: {path}: expected a mapping of {_type_name(tp)} keys, got {quote(value)}")
        return build(tp, value, where, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {path}: expected true or false, got {quote(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: {path}: expected an integer, got {quote(value)}")
        if not -INT_LIMIT < value < INT_LIMIT:
            raise UserError(f"{where}: {path}: {quote(value)} is out of range; an integer must lie strictly between "
                            f"-2^63 and 2^63")
        return value
    if tp is float:
        return _finite_float(value, where, path)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: {path}: expected a string, got {quote(value)}")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {path}")


def _item_key(item, index: int) -> str:
    """How a message addresses a list item: by its name where it has one (``levels.codebook.lr``, as ``--set``
    writes it), else by its position."""
    name = item.get("name") if isinstance(item, dict) else None
    return quote_key(name) if isinstance(name, str) and name else str(index)


def _finite_float(value, where: str, path: str) -> float:
    number = value
    if isinstance(value, str):
        # PyYAML reads 1e-4 (no dot) as a string (YAML 1.1); accept what any reader would call a number.
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise UserError(f"{where}: {path}: expected a number, got {quote(value)}")
    try:
        number = float(number)
    except OverflowError:  # an integer beyond the float range
        number = math.inf
    # NaN would pass every range check below (all its comparisons are false), and inf is no setting either.
    if not math.isfinite(number):
        raise UserError(f"{where}: {path}: {quote(value)} is not a finite number")
    return number


def _check_range(value, meta: dict, where: str, path: str) -> None:
    if value is None:
        return
    # A list field's range applies to each of its items, unless its choices are lists themselves (data.range).
    if isinstance(value, list) and not any(isinstance(c, list) for c in meta.get("choices") or ()):
        for i, item in enumerate(value):
            _check_range(item, meta, where, f"{path}.{i}")
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise UserError(f"{where}: {path}: {quote(value)} is not allowed; choose one of {', '.join(map(_shown, choices))}")
    low, high, above = meta.get("min"), meta.get("max"), meta.get("above")
    if low is not None and value < low:
        raise UserError(f"{where}: {path}: {quote(value)} is below the minimum {low}")
    if high is not None and value > high:
        raise UserError(f"{where}: {path}: {quote(value)} is above the maximum {high}")
    if above is not None and value <= above:
        raise UserError(f"{where}: {path}: {quote(value)} must be greater than {above}")


def build(cls, data: dict, where: str, prefix: str = ""):
    """Make ``cls`` from a mapping, rejecting unknown keys (with the nearest valid one) and bad values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            path = f"{prefix}.{quote_key(key)}" if prefix else quote_key(key)
            hint = did_you_mean(quote_key(key), fields)
            raise UserError(f"{where}: {path}: unknown key; {hint}(valid keys: {', '.join(fields) or 'none'})")
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{where}: {path}: required key is missing")
            continue
        value = data[name]
        if value is False and "off" in (f.metadata.get("choices") or ()):
            # PyYAML reads an unquoted off (also no, false) as a boolean (YAML 1.1): the choice "off" is meant.
            value = "off"
        value = _convert(value, hints[name], where, path)
        _check_range(value, f.metadata, where, path)
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _validate(cfg: Config, where: str) -> None:
    """Checks that span several keys, and the registered choices."""
    names = [level.name for level in cfg.levels]
    if not names:
        raise UserError(f"{where}: levels: at least one level is required")
    if len(set(names)) != len(names):
        raise UserError(f"{where}: levels: level names must be unique, got {quote(names)}")
    for level in cfg.levels:
        for lower in level.lower:
            if lower not in names or lower == level.name:
                raise UserError(f"{where}: levels.{quote_key(level.name)}.lower: {quote(lower)} is not another level "
                                f"(levels: {cut(', '.join(map(quote, names)))})")
    cycle = _lower_cycle(cfg.levels)
    if cycle:
        # Betty would wait on each level of the cycle for the one below it: nothing trains and the run "succeeds".
        raise UserError(f"{where}: levels.{quote_key(cycle[0])}.lower: the lower edges form a cycle "
                        f"{cut(' -> '.join(map(quote, cycle)))}; a level cannot be below itself")
    _check_registered(cfg, where)
    _check_model(cfg, where)
    for level in cfg.levels:
        _check_optimizer_settings(level, f"{where}: levels.{quote_key(level.name)}")
    if cfg.hypergradient.roll_back and cfg.hypergradient.xi == 0:
        raise UserError(f"{where}: hypergradient.roll_back: needs xi > 0 (with xi = 0 there is no tentative lower step to roll back)")
    accumulating = [level.name for level in cfg.levels if level.grad_accumulation > 1]
    if cfg.hypergradient.roll_back and accumulating:
        raise UserError(f"{where}: levels.{quote_key(accumulating[0])}.grad_accumulation: Algorithm 1's roll-back "
                        "redoes one lower step per codebook step; it is not defined with gradient accumulation (set "
                        "grad_accumulation: 1 or hypergradient.roll_back: false)")
    inner_steps = cfg.hypergradient.inner_steps
    if inner_steps > 1 and cfg.hypergradient.xi != 0:
        raise UserError(f"{where}: hypergradient.inner_steps: {inner_steps} needs xi: 0; inner codebook steps are "
                        "alternated optimization's (Huh Table 10), and with xi != 0 the codebook takes one step per "
                        "iteration, on the hypergradient through the lower level's step")
    if inner_steps > 1 and accumulating:
        raise UserError(f"{where}: hypergradient.inner_steps: {inner_steps} with levels.{quote_key(accumulating[0])}."
                        "grad_accumulation > 1: Huh Table 10's inner steps are optimizer steps on parts of one batch; "
                        "accumulating across them is not defined (set one of the two to 1)")
    if cfg.hypergradient.mutual:
        _check_mutual(cfg, where, accumulating)
    if cfg.hypergradient.unroll_steps > 1:
        _check_unroll(cfg, where, accumulating)
    if cfg.perf.cuda_graphs:
        _check_cuda_graphs(cfg, where)
    if cfg.data.batch_size % inner_steps:
        raise UserError(f"{where}: hypergradient.inner_steps: {inner_steps} does not divide data.batch_size = "
                        f"{cfg.data.batch_size}; each inner step takes an equal 1/{inner_steps} of the batch")
    if cfg.quantizer.dim % cfg.quantizer.groups:
        raise UserError(f"{where}: quantizer.groups: {cfg.quantizer.groups} does not divide quantizer.dim = {cfg.quantizer.dim}")
    # Sections whose checks need more than the config's text (the prior's source run): registered checks.
    for check in registry.VALIDATORS.values():
        check(cfg, where)


# The optimizers that take a scheduled lr as a device tensor without reading it on the host (fused Adam and AdamW).
GRAPH_SAFE_SCHEDULED_OPTIMIZERS = ("adam", "adamw")


def _check_cuda_graphs(cfg: Config, where: str) -> None:
    if cfg.device == "cpu":
        raise UserError(f"{where}: perf.cuda_graphs: true needs a CUDA device (device: cpu); a CUDA graph replays GPU "
                        "kernels (set it to false)")
    if cfg.perf.compile:
        raise UserError(f"{where}: perf.cuda_graphs with perf.compile: torch.compile captures graphs of its own; set "
                        "one of the two to false")
    for level in cfg.levels:
        if level.scheduler != "constant" and level.optimizer not in GRAPH_SAFE_SCHEDULED_OPTIMIZERS:
            raise UserError(f"{where}: perf.cuda_graphs with levels.{quote_key(level.name)}.optimizer "
                            f"{quote(level.optimizer)} and a schedule: the lr becomes a device tensor, which only "
                            f"{', '.join(GRAPH_SAFE_SCHEDULED_OPTIMIZERS)} read on the device (torch's SGD reads it "
                            "on the host); use scheduler: constant or one of those")
    # (A method says so when it registers, mqvae.method.hypergradients.register_hypergradient: mqvae and direct do;
    # Betty's darts reads ||v|| on the host every step, and Betty's neumann, cg and sama are not checked.)
    if not registry.HYPERGRADIENT_TRAITS.get(cfg.hypergradient.type, {}).get("graph_safe", False):
        raise UserError(f"{where}: perf.cuda_graphs with hypergradient.type {quote(cfg.hypergradient.type)}: only a "
                        "method registered with graph_safe=True replays as a graph (mqvae, direct; darts reads a norm "
                        "on the host every step)")


def _check_model(cfg: Config, where: str) -> None:
    """The model section against its kind (registered, so known here by name): a key the kind does not read is
    refused unless it keeps its default (it would change nothing), then the kind's own checks."""
    kind = registry.MODELS[cfg.model.kind]
    if kind.model_keys is not None:
        defaults = ModelConfig()
        for f in dataclasses.fields(ModelConfig):
            value, default = getattr(cfg.model, f.name), getattr(defaults, f.name)
            if f.name == "kind" or f.name in kind.model_keys or value == default:
                continue
            readers = [name for name, other in registry.MODELS.items() if f.name in (other.model_keys or ())]
            read_by = f"read by model.kind {', '.join(readers)} only" if readers else "read by no model kind"
            raise UserError(f"{where}: model.{f.name}: {quote(value)} is {read_by}, not by kind "
                            f"{quote(cfg.model.kind)}; remove it (the default is {quote(default)})")
    if cfg.model.dropout and any(level.lower for level in cfg.levels) and cfg.hypergradient.xi != 0:
        # Each forward draws new masks: Eq. 13's two perturbed passes (and the direct term's) would see different
        # networks, and their difference over 2 eps would be the masks' effect, not the hypergradient.
        raise UserError(f"{where}: model.dropout: {cfg.model.dropout} with a level below another: each forward draws "
                        "new dropout masks, so the hypergradient's finite difference (Eq. 13) would measure the masks; "
                        "set dropout: 0, xi: 0, or use one level")
    try:
        kind.check_settings(cfg)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def _check_mutual(cfg: Config, where: str, accumulating: list[str]) -> None:
    """MQ-VAE‡ is defined for one level above one other (App. E): the two players of a policy-prediction game."""
    edges = [(level.name, lower) for level in cfg.levels for lower in level.lower]
    if len(cfg.levels) != 2 or len(edges) != 1:
        raise UserError(f"{where}: hypergradient.mutual: mutual look-ahead (MQ-VAE‡) is defined for two levels, one "
                        f"below the other; this config has {len(cfg.levels)} levels and {len(edges)} lower edges")
    if cfg.hypergradient.xi == 0:
        raise UserError(f"{where}: hypergradient.mutual: needs xi > 0 (with xi = 0 neither side takes a tentative step "
                        "to look through)")
    if cfg.hypergradient.roll_back:
        raise UserError(f"{where}: hypergradient.roll_back: with mutual: true both tentative steps are always undone "
                        "and both real steps start from the same state (App. E), so there is no real lower step "
                        "left to redo; set roll_back: false")
    if accumulating:
        raise UserError(f"{where}: levels.{quote_key(accumulating[0])}.grad_accumulation: mutual look-ahead takes one "
                        "real step of each side per iteration; set grad_accumulation: 1")


def _check_unroll(cfg: Config, where: str, accumulating: list[str]) -> None:
    """k-step unrolls (MQ-VAE §4.2) where the recursion through the k steps is defined and implemented."""
    k, given = cfg.hypergradient.unroll_steps, cfg.hypergradient
    key = f"{where}: hypergradient.unroll_steps: {k}"
    if given.xi == 0:
        raise UserError(f"{key} needs xi > 0: with xi = 0 (alternated optimization) there are no tentative steps to "
                        "look through")
    if given.mutual:
        raise UserError(f"{key} with mutual: true: MQ-VAE‡ looks through one tentative step of each side (App. E); "
                        "set unroll_steps: 1 or mutual: false")
    if accumulating:
        raise UserError(f"{key} with levels.{quote_key(accumulating[0])}.grad_accumulation > 1: the k steps are "
                        "optimizer steps, each the hypergradient looks through; set grad_accumulation: 1")
    if not registry.HYPERGRADIENT_TRAITS.get(given.type, {}).get("unroll_steps", False):
        raise UserError(f"{key}: hypergradient.type {quote(given.type)} looks through the latest tentative step only "
                        "(Betty's methods take one step's parameters); use type: mqvae or direct, or register a method "
                        "that reads every step of context.steps with register_hypergradient(..., unroll_steps=True)")
    middle = {lower for level in cfg.levels for lower in level.lower} & {level.name for level in cfg.levels if level.lower}
    if middle:
        raise UserError(f"{key}: level {quote(sorted(middle)[0])} is both above and below another level; k-step "
                        "unrolls are implemented where every level below another is a lowest level (two levels, or "
                        "several levels above one)")


def _check_optimizer_settings(level: LevelConfig, where: str) -> None:
    """Settings that the level's optimizer or schedule would ignore are refused (for the built-in names; a user's
    optimizer reads what it needs)."""
    if level.betas is not None:
        if len(level.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in level.betas):
            raise UserError(f"{where}.betas: expected two numbers in [0, 1), e.g. [0.5, 0.9], got {quote(level.betas)}")
    if level.optimizer == "sgd" and (level.betas is not None or level.eps is not None):
        raise UserError(f"{where}: betas and eps are Adam's settings; the sgd optimizer does not use them")
    if level.min_lr and level.scheduler not in ("cosine", "warmup_cosine"):
        raise UserError(f"{where}.min_lr: the floor of the cosine and warmup_cosine schedules; scheduler "
                        f"{quote(level.scheduler)} does not use it")
    if level.min_lr > level.lr:
        raise UserError(f"{where}.min_lr: {level.min_lr} is above the level's lr {level.lr}; a schedule anneals down to it")


def registries() -> dict:
    """The config keys whose values are registered names (``mqvae.registry``), each with its registry (``run.py
    --list`` prints them)."""
    return {"data.name": registry.DATASETS, "model.kind": registry.MODELS, "quantizer.kind": registry.QUANTIZERS,
            "levels.*.problem": registry.PROBLEMS, "hypergradient.type": registry.HYPERGRADIENTS,
            "levels.*.optimizer": registry.OPTIMIZERS, "levels.*.scheduler": registry.SCHEDULERS}


def _check_registered(cfg: Config, where: str) -> None:
    """Registered names are the choices (``registries``); each level's ``params`` becomes its kind's Params."""
    choices = registries()

    def check(value, key, path):
        if value not in choices[key]:
            raise UserError(f"{where}: {path}: {choices[key].unknown(value)}")

    for key in ("data.name", "model.kind", "quantizer.kind"):
        section, name = key.split(".")
        check(getattr(getattr(cfg, section), name), key, key)
    check(cfg.hypergradient.type, "hypergradient.type", "hypergradient.type")
    for level in cfg.levels:
        path = f"levels.{quote_key(level.name)}"
        for field in ("problem", "optimizer", "scheduler"):
            check(getattr(level, field), f"levels.*.{field}", f"{path}.{field}")
        params_cls = getattr(choices["levels.*.problem"][level.problem], "Params", None)
        if not dataclasses.is_dataclass(params_cls):
            raise UserError(f"{where}: {path}.problem: {level.problem}.Params is not a dataclass; a level's settings are "
                            "declared as one (problems.Level's contract)")
        level.params = build(params_cls, level.params, where, f"{path}.params")


def _lower_cycle(levels: list[LevelConfig]) -> list[str]:
    """A cycle of the upper -> lower edges as ``[a, b, ..., a]``, or ``[]`` when the graph has none.

    Levels whose lower levels are all gone are removed until none is left to remove (Kahn's algorithm on the
    reversed edges). Each level still there has a lower level still there, so walking down from any of them
    comes back to a level already on the walk."""
    lowers = {level.name: list(dict.fromkeys(level.lower)) for level in levels}
    uppers: dict[str, list[str]] = {name: [] for name in lowers}
    for upper, below in lowers.items():
        for lower in below:
            uppers[lower].append(upper)
    lowers_left = {name: len(below) for name, below in lowers.items()}
    removable = [name for name, count in lowers_left.items() if count == 0]
    while removable:
        name = removable.pop()
        del lowers_left[name]
        for upper in uppers[name]:
            lowers_left[upper] -= 1
            if lowers_left[upper] == 0:
                removable.append(upper)
    if not lowers_left:
        return []
    walk, position = [next(iter(lowers_left))], {}
    while walk[-1] not in position:
        position[walk[-1]] = len(walk) - 1
        walk.append(next(lower for lower in lowers[walk[-1]] if lower in lowers_left))
    return walk[position[walk[-1]]:]


# ---------------------------------------------------------------------------------------------
# YAML text and --set overrides.

# More values than this once a YAML text's aliases are expanded is an alias bomb (the "billion laughs", 326 bytes
# that stand for 10^9 strings), not a config: the largest shipped file has under 100.
MAX_YAML_VALUES = 10_000

# What PyYAML raises on a text it cannot read: YAMLError, and what its constructors hit on a malformed scalar
# (`!!bool x`: KeyError, `!!timestamp 1`: AttributeError, the date 2020-13-45 or a 5000-digit integer: ValueError).
_YAML_FAILURES = (yaml.YAMLError, ValueError, LookupError, TypeError, AttributeError)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data, no Python tags) refusing a key given twice in one mapping, where
    PyYAML would silently keep the last value."""

    def construct_mapping(self, node, deep=False):
        first_at = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged in with `<<: *base` are there to be overridden
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # PyYAML's own construct_mapping reports it
            if key in first_at:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {quote(key)} is given twice (first at line {first_at[key].line + 1})",
                    key_node.start_mark)
            first_at[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict) -> float:
    """How many values ``node`` stands for with every alias expanded. Each distinct node is visited once
    (``sizes`` by node id), so this is fast however large the expansion; a node inside itself is infinite."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = math.inf  # reaching the node again before it is counted means that it contains itself
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _load(text: str, where: str):
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise UserError(f"{where}: YAML aliases expand this text to more than {MAX_YAML_VALUES} values; "
                            "write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_yaml(text: str, where: str):
    """The data of a YAML text; any problem is a one-line UserError starting with ``where``."""
    try:
        return _load(text, where)
    except RecursionError:
        raise UserError(f"{where}: YAML nested too deeply to read") from None
    except _YAML_FAILURES as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{where}: not valid YAML{line}: {cut(' '.join(problem.split()))}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise UserError(f"--set {quote_key(text)}: expected KEY=VALUE, e.g. --set train.iters=100")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise UserError(f"--set {quote_key(text)}: the key is empty or has an empty part; expected KEY=VALUE, "
                        "e.g. --set train.iters=100")
    return keys, parse_yaml(raw, f"--set {quote_key(key.strip())}")


def _apply_override(data: dict, keys: list[str], value, where: str) -> None:
    node = data
    for depth, key in enumerate(keys[:-1]):
        node = node[_list_index(node, key, where, keys)] if isinstance(node, list) else node.setdefault(key, {})
        _check_section(node, keys, depth + 1, where)
    if isinstance(node, list):
        node[_list_index(node, keys[-1], where, keys)] = value
    else:
        node[keys[-1]] = value


def _check_section(node, keys: list[str], depth: int, where: str) -> None:
    """``node``, reached by ``keys[:depth]``, must hold keys (a mapping) or items (a list) for the rest of the path."""
    if not isinstance(node, (dict, list)):
        raise UserError(f"{where}: --set {quote_key('.'.join(keys))}: '{quote_key('.'.join(keys[:depth]))}' is "
                        f"{quote(node)}, not a section")


def _list_index(items: list, key: str, where: str, keys: list[str]) -> int:
    """Levels are addressed by position (``levels.0.lr``) or by name (``levels.codebook.lr``)."""
    # isdecimal: digits only (int() also reads " 1", "+1" and "1_0"); under 19 of them, as int() refuses very long ones.
    if key.isdecimal() and len(key) < 19 and int(key) < len(items):
        return int(key)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    names = [item["name"] for item in items if isinstance(item, dict) and isinstance(item.get("name"), str)]
    named = f"; names: {cut(', '.join(names))}" if names else ""
    raise UserError(f"{where}: --set {quote_key('.'.join(keys))}: no list item {quote(key)} (by position below "
                    f"{len(items)} or by name{named}); {did_you_mean(key, names)}".rstrip("; "))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except OSError as exc:  # e.g. a symbolic link loop, a folder without permission, a name too long
        raise UserError(f"{cut(str(path))}: cannot read the config file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{path}: is a folder, not a config file (a run folder is continued with --resume {path})")
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: is not a regular file (a device, a pipe or a socket); a config is a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a UTF-8 text file (byte {exc.start} is not UTF-8)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the file: {exc.strerror}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return data


def read_config(path: str | Path, chain: tuple[Path, ...] = ()) -> dict:
    """An experiment file's keys with its ``base:`` chain resolved: ``base: FILE`` (relative to the file's folder)
    names a config whose keys this file overrides key by key. Mappings merge recursively; any other value, a list
    such as ``levels`` included, replaces the base's whole. A base may have a base; a cycle is refused."""
    path = Path(path)
    data = read_yaml(path)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise UserError(f"{path}: base: expected the path of a config file (relative to {path.parent}), got {quote(base)}")
    here = path.resolve()
    base_path = path.parent / base
    if base_path.resolve() in (*chain, here):
        start = (*chain, here)[0].parent
        names = " -> ".join(os.path.relpath(p, start) for p in (*chain, here, base_path.resolve()))
        raise UserError(f"{path}: base: {base} makes a cycle ({cut(names)})")
    if not base_path.exists():
        raise UserError(f"{path}: base: {base_path} not found (the path is relative to the config's folder)")
    return _merged(read_config(base_path, (*chain, here)), data)


def _merged(base: dict, file: dict) -> dict:
    merged = dict(base)
    for key, value in file.items():
        both_mappings = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both_mappings else value
    return merged


def load_config(path: str | Path, overrides: list[str] = (), imports: list[str] = ()) -> Config:
    """Read a YAML experiment file (its ``base:`` chain resolved), apply ``--set`` overrides and ``--import``
    modules, validate, and return the typed config."""
    data = read_config(path)
    return config_from_dict(data, str(path), overrides, imports)


def config_from_dict(data: dict, where: str, overrides: list[str] = (), imports: list[str] = ()) -> Config:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value, where)
    # The user's modules first: what they register is what the rest of the config may name.
    entries = _convert(data.get("imports", []), list[str], where, "imports") + list(imports)
    data["imports"] = list(dict.fromkeys(plugins.resolved(entry) for entry in entries))
    plugins.import_plugins(data["imports"], where)
    cfg = build(Config, data, where)
    _validate(cfg, where)
    return cfg
