"""check_feasible: geometry and memory checked on the meta device, against numbers computed by hand or from the
real model built on the CPU."""

from __future__ import annotations

import os
import time
import types
from pathlib import Path

import pytest
import torch

import problems  # noqa: F401  (registers the level kinds the configs name)
from mqvae.config import feasibility
from mqvae.config import QuantizerConfig, config_from_dict, load_config, read_yaml
from mqvae.config.feasibility import MemoryEstimate, NetworkSize, check_feasible, estimate_memory, network_size, quantizer_size
from mqvae.method.models import build_model
from mqvae.method.models import build_quantizer

from helpers import is_base_config, one_line_error

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
DIGITS = ROOT / "configs/digits/mqvae.yaml"
# (channels, image size, classes) of each built-in data set a shipped config names (mqvae/data/datasets.py).
SHAPES = {"digits": (1, 16, 10), "mnist": (1, 28, 10), "fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10),
          "cifar100": (3, 32, 100), "svhn": (3, 32, 10)}


def tiny(**sections):
    """A one-level config with the given sections (mapping of keys each)."""
    return config_from_dict({"levels": [{"name": "vqvae", "problem": "VQVAE"}], **sections}, "x.yaml")


def real_network(cfg, channels, num_classes):
    model = build_model(cfg, channels, num_classes, 16)
    return torch.nn.ModuleList([model.encoder, model.decoder])


def test_a_tiny_model_by_hand():
    # 1 channel, 4 px, hidden 2, one stride-2 stage, no residual block, 1-dim codes, 5 codes, batch 2, Adam.
    cfg = tiny(model={"hidden_channels": 2, "res_channels": 1, "num_res_blocks": 0, "downsample": 1},
               quantizer={"num_codes": 5, "dim": 1}, data={"batch_size": 2})
    size = network_size(cfg, 1, 4, 10)
    # Encoder: 4x4 conv 1->2 (2*16 + 2), 3x3 conv 2->2 (4*9 + 2), 1x1 conv 2->1 (2 + 1);
    # decoder: 3x3 conv 1->2 (2*9 + 2), 4x4 transposed conv 2->1 (2*16 + 1).
    assert size.parameters == 34 + 38 + 3 + 20 + 33
    # Encoder outputs (2x2 after the stride-2 conv): conv 8, ReLU 8, conv 8, ReLU 8, conv 4 (nn.Identity, the
    # norm, makes nothing new); decoder: conv 8, ReLU 8, transposed conv 16 (4x4).
    assert size.activations == 36 + 32 and size.positions == 4 and size.buffer_bytes == 0
    # Codebook 5 x 1 and one int64 latent group per code.
    assert quantizer_size(cfg.quantizer) == (5, 40)
    # Adam: parameter, gradient and two moments; activations: the quantizer's 4 copies of each 1-dim latent
    # vector; twice for the backward; float32.
    assert estimate_memory(cfg, 1, 4, 10) == MemoryEstimate(codebook=4 * 4 * 5 + 40, network=4 * 4 * 128,
                                                           activations=4 * 2 * 2 * (68 + 4 * 4))


@pytest.mark.parametrize("sets", [[], ["model.norm=batch", "model.num_res_blocks=5"], ["model.downsample=1"],
                                  ["model.kind=resnet18"]])
def test_network_size_is_that_of_the_real_model(sets):
    cfg = load_config(DIGITS, sets)
    real = real_network(cfg, 1, 10)
    size = network_size(cfg, 1, 16, 10)
    assert size.parameters == sum(p.numel() for p in real.parameters())
    assert size.buffer_bytes == sum(b.numel() * b.element_size() for b in real.buffers())


def test_residual_blocks_are_extrapolated_exactly():
    # Against the real 7-block network on the CPU: every leaf module's output that is not its input counts.
    cfg = load_config(DIGITS, ["model.num_res_blocks=7"])
    real = real_network(cfg, 1, 10).eval()
    outputs = []

    def count(module, inputs, output):
        if not any(output is x for x in inputs):
            outputs.append(output.numel())

    for leaf in real.modules():
        if next(leaf.children(), None) is None:
            leaf.register_forward_hook(count)
    encoder, decoder = real
    with torch.no_grad():
        z_e = encoder(torch.rand(1, 1, 16, 16))
        decoder(z_e)
    assert network_size(cfg, 1, 16, 10) == NetworkSize(
        parameters=sum(p.numel() for p in real.parameters()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in real.buffers()),
        activations=sum(outputs), positions=16 // 2**cfg.model.downsample * (16 // 2**cfg.model.downsample))


@pytest.mark.parametrize("keys", [{}, {"groups": 2}, {"affine": "learned", "affine_groups": 4}, {"affine": "ema", "affine_groups": 2},
                                  {"replace_freq": 5}, {"kind": "gumbel", "kmeans_init": False},
                                  {"codebook_mlp": [32], "kmeans_init": False},
                                  {"codebook_mlp": [6, 5], "groups": 2, "affine": "learned", "kmeans_init": False}])
def test_quantizer_size_is_that_of_the_real_quantizer(keys):
    cfg = QuantizerConfig(num_codes=16, dim=8, **keys)
    real = build_quantizer(cfg)
    assert quantizer_size(cfg) == (sum(p.numel() for p in real.parameters()),
                                   sum(b.numel() * b.element_size() for b in real.buffers()))


def test_optimizer_state_counts_every_level():
    base = {"quantizer": {"num_codes": 5, "dim": 1}}
    sgd = config_from_dict({**base, "levels": [{"name": "a", "problem": "VQVAE", "optimizer": "sgd"}]}, "x.yaml")
    momentum = config_from_dict({**base, "levels": [{"name": "a", "problem": "VQVAE", "optimizer": "sgd", "momentum": 0.9}]}, "x.yaml")
    two_adams = config_from_dict({**base, "levels": [{"name": "a", "problem": "Codebook", "lower": ["b"]},
                                                     {"name": "b", "problem": "AutoEncoder", "optimizer": "adamw"}]}, "x.yaml")
    codebook = [estimate_memory(cfg, 1, 16, 10).codebook - 40 for cfg in (sgd, momentum, two_adams)]
    # 5 parameters of 4 bytes: (parameter + gradient) x 2 + states; parameters count once, each level's states.
    assert codebook == [4 * 5 * 2, 4 * 5 * 3, 4 * 5 * 6]


def test_shipped_configs_are_feasible_on_their_data_sets(monkeypatch):
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if is_base_config(path):
            continue
        if "sweep" not in read_yaml(path) and "prior" not in read_yaml(path):  # a prior's needs its source run
            cfg = load_config(path)
            # A modest GPU; MQ-GAN's 256-px image folders on the authors' 80-GB cards (estimated at 51.5 GiB).
            gan = cfg.data.name == "image_folder"
            monkeypatch.setattr(feasibility, "available_memory", lambda device: (80 if gan else 16) * 2**30)
            shape = (3, cfg.data.image_size, 1) if gan else SHAPES[cfg.data.name]
            check_feasible(cfg, *shape, torch.device("cuda"))


@pytest.mark.parametrize("downsample, image_size, most", [(5, 16, 4), (3, 28, 2), (1, 15, 0)])
def test_a_network_deeper_than_the_images_is_one_line(downsample, image_size, most):
    cfg = load_config(DIGITS, [f"model.downsample={downsample}"])
    one_line_error(lambda: check_feasible(cfg, 1, image_size, 10, CPU), "model.downsample: ", f"{image_size}-px",
                   "'digits'", f"divisible by 2^{most} at most")


def test_the_classifier_takes_any_image_size():
    cfg = load_config(ROOT / "configs/digits/classify_mqvae.yaml")
    check_feasible(cfg, 1, 7, 10, CPU)


@pytest.mark.parametrize("sets, key", [
    (["quantizer.num_codes=1000000000000"], "quantizer.num_codes"),
    (["quantizer.num_codes=1000000000000", "quantizer.affine=ema"], "quantizer.num_codes"),
    (["quantizer.codebook_mlp=[8, 1000000000000]", "quantizer.kmeans_init=false"], "quantizer.codebook_mlp"),
    (["model.hidden_channels=1000000"], "model.hidden_channels"),
    (["model.res_channels=100000000", "data.batch_size=1"], "model.res_channels"),
    (["data.batch_size=1000000000"], "data.batch_size"),
    (["model.hidden_channels=1000000000000"], "model.hidden_channels"),  # a layer torch cannot even describe
    (["model.num_res_blocks=1000000000000"], "data.batch_size"),
])
def test_a_run_too_large_for_the_machine_is_one_line_naming_the_key(sets, key):
    cfg = load_config(DIGITS, sets)
    started = time.perf_counter()
    one_line_error(lambda: check_feasible(cfg, 1, 16, 10, CPU), f"{key}: ", f"lower {key}")
    assert time.perf_counter() - started < 5


def test_the_estimate_is_compared_with_the_device_memory(monkeypatch):
    cfg = load_config(DIGITS)
    total = estimate_memory(cfg, 1, 16, 10).total
    monkeypatch.setattr(feasibility, "available_memory", lambda device: total)
    check_feasible(cfg, 1, 16, 10, CPU)
    monkeypatch.setattr(feasibility, "available_memory", lambda device: total - 1)
    message = one_line_error(lambda: check_feasible(cfg, 1, 16, 10, CPU), "GiB", "this machine")
    assert f"{total / 2**30:.3g} GiB" in message


def test_available_memory_is_the_device_total_or_the_physical_memory(monkeypatch):
    assert feasibility.available_memory(CPU) == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=123))
    assert feasibility.available_memory(torch.device("cuda", 0)) == 123
