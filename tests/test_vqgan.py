"""model.kind: vqgan, the VQ-GAN encoder and decoder (mqvae.nn.vqgan): shapes, where attention goes, the parameter
count against a hand formula, quant_conv and the LayerNorm of z against their formulas, training through the
engine on one and two levels, the decoders' last layer, and the one-line refusals."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import problems  # noqa: F401  (registers the level kinds the configs name)
from mqvae.config import ModelConfig
from mqvae.config.feasibility import check_feasible, network_size
from mqvae.method.models import build_model
from mqvae.nn.networks import Decoder, QuantizedNetwork
from mqvae.nn.vqgan import ChannelLayerNorm, Downsample, ResidualBlock, SelfAttention, Upsample, VQGANDecoder, \
    VQGANEncoder
from mqvae.registry import MODELS

from helpers import measured, one_line_error, tiny_config, tiny_engine, two_levels

CPU = torch.device("cpu")
# The digits (16 px) at the smallest widths that keep GroupNorm's groups meaningful.
DIGITS_VQGAN = {"kind": "vqgan", "hidden_channels": 8, "ch_mult": [1, 2], "attn_resolutions": [8], "norm_groups": 4,
                "num_res_blocks": 1}


def small(**keys) -> ModelConfig:
    """A narrow VQ-GAN model section (8 channels, 4 GroupNorm groups) with ``keys`` changed."""
    return ModelConfig(**{"kind": "vqgan", "hidden_channels": 8, "norm_groups": 4, "num_res_blocks": 1, **keys})


# -- shapes and placement ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ch_mult", [[1, 2, 2, 4], [1, 1, 2, 2, 4]], ids=["f8", "f16"])
@pytest.mark.parametrize("size", [64, 256])
def test_the_latent_is_the_image_over_2_to_the_stages_and_the_decoder_gives_the_size_back(ch_mult, size):
    cfg = small(ch_mult=ch_mult, z_channels=6)
    encoder, decoder = VQGANEncoder(3, cfg, 4, size), VQGANDecoder(3, cfg, 4, size)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        z = encoder(x)
        side = size // 2 ** (len(ch_mult) - 1)  # f8: size / 8, f16: size / 16
        assert z.shape == (2, 4, side, side)
        assert decoder(z).shape == x.shape
    assert MODELS["vqgan"].downsample(cfg) == len(ch_mult) - 1


def attention_sides(module: nn.Module, x: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """The side of the feature map each SelfAttention of ``module`` sees, in the order they run, and the output."""
    sides = []
    hooks = [m.register_forward_hook(lambda m, inputs, out: sides.append(inputs[0].shape[-1]))
             for m in module.modules() if isinstance(m, SelfAttention)]
    with torch.no_grad():
        out = module(x)
    for hook in hooks:
        hook.remove()
    return sides, out


@pytest.mark.parametrize("ch_mult, size, attn, blocks, encoder_sides, decoder_sides", [
    # f16 at 256 px, taming's attention at 16: the deepest level's blocks, and the middle of each half (at 16 too).
    ([1, 1, 2, 2, 4], 256, [16], 2, [16, 16, 16], [16, 16, 16, 16]),
    # f8 at 64 px (levels at 64, 32, 16, 8) with attention at 32 and 16: 2 blocks per encoder level, 3 per decoder's.
    ([1, 2, 2, 4], 64, [32, 16], 2, [32, 32, 16, 16, 8], [8, 16, 16, 16, 32, 32, 32]),
    # No level attends: the middles alone.
    ([1, 2], 16, [], 3, [8], [8]),
])
def test_attention_follows_each_block_of_the_levels_whose_side_is_listed(ch_mult, size, attn, blocks, encoder_sides,
                                                                         decoder_sides):
    cfg = small(ch_mult=ch_mult, attn_resolutions=attn, num_res_blocks=blocks)
    encoder, decoder = VQGANEncoder(1, cfg, 4, size), VQGANDecoder(1, cfg, 4, size)
    sides, z = attention_sides(encoder, torch.rand(1, 1, size, size))
    # By hand: num_res_blocks per listed level in the encoder, one more in the decoder, and one in each middle.
    assert len(encoder_sides) == blocks * len(attn) + 1 and len(decoder_sides) == (blocks + 1) * len(attn) + 1
    assert sides == encoder_sides
    assert attention_sides(decoder, z)[0] == decoder_sides
    # Each one right after a residual block (or in the middle, between two).
    for half in (encoder, decoder):
        layers = list(half.net)
        assert all(isinstance(layers[i - 1], ResidualBlock)
                   for i, layer in enumerate(layers) if isinstance(layer, SelfAttention))


def test_a_residual_block_and_attention_are_their_formulas_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    block = ResidualBlock(8, 12, groups=4, dropout=0.0).double()
    gn1, _, conv1, gn2, _, _, conv2 = block.block

    def swish(t):
        return t * torch.sigmoid(t)

    def norm(t, gn):  # GroupNorm: each sample's groups of channels to mean 0, variance 1, then scale and shift
        g = t.reshape(t.shape[0], gn.num_groups, -1)
        g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + gn.eps)
        return g.reshape(t.shape) * gn.weight[:, None, None] + gn.bias[:, None, None]

    inner = F.conv2d(swish(norm(x, gn1)), conv1.weight, conv1.bias, padding=1)
    inner = F.conv2d(swish(norm(inner, gn2)), conv2.weight, conv2.bias, padding=1)
    shortcut = torch.einsum("oc,bchw->bohw", block.shortcut.weight[:, :, 0, 0], x) + block.shortcut.bias[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(block(x), shortcut + inner)
        assert torch.equal(ResidualBlock(8, 8, 4, 0.0).shortcut(x), x)  # same width: the input itself

    attention = SelfAttention(8, groups=4).double()
    h = norm(x, attention.norm)

    def project(conv, t):
        return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], t) + conv.bias[:, None, None]

    q, k, v = (project(c, h).flatten(2) for c in (attention.q, attention.k, attention.v))  # [b, c, positions]
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(8), dim=-1)  # over the keys j
    attended = torch.einsum("bij,bcj->bci", weights, v).reshape(x.shape)
    with torch.no_grad():
        torch.testing.assert_close(attention(x), x + project(attention.out, attended))


def test_the_stride_2_stage_pads_right_and_bottom_only():
    down = Downsample(1)
    x = torch.rand(1, 1, 7, 7, requires_grad=True)
    out = down(x)
    assert out.shape[-2:] == (3, 3)  # floor(7 / 2)
    (grad,) = torch.autograd.grad(out[0, 0, 0, 0], x)
    # The first output sees the input's rows and columns 0-2 (no padding above or left of it).
    assert torch.equal(grad[0, 0] != 0, torch.zeros(7, 7, dtype=torch.bool).index_fill(0, torch.arange(3), True)
                       & torch.zeros(7, 7, dtype=torch.bool).index_fill(1, torch.arange(3), True))
    assert Upsample(1)(torch.rand(1, 1, 3, 3)).shape[-2:] == (6, 6)


def conv(i, o, k):
    return i * o * k * k + o


def group_norm(c):
    return 2 * c


def residual(i, o):
    return group_norm(i) + conv(i, o, 3) + group_norm(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)


def attention(c):
    return group_norm(c) + 4 * conv(c, c, 1)


def test_the_parameter_count_of_a_tiny_config_is_the_hand_formula():
    # 1 channel, 8 px, hidden 4, ch_mult [1, 2] (levels of side 8 and 4, widths 4 and 8), one block per level,
    # attention at side 4, z_channels 3, code dim 2, quant_conv, LayerNorm on z.
    cfg = small(hidden_channels=4, ch_mult=[1, 2], attn_resolutions=[4], norm_groups=2, z_channels=3)
    encoder, decoder = VQGANEncoder(1, cfg, 2, 8), VQGANDecoder(1, cfg, 2, 8)
    want_encoder = (conv(1, 4, 3) + residual(4, 4) + conv(4, 4, 3)  # conv_in, level 0, the stride-2 conv
                    + residual(4, 8) + attention(8)  # level 1 (side 4)
                    + residual(8, 8) + attention(8) + residual(8, 8)  # middle
                    + group_norm(8) + conv(8, 3, 3) + conv(3, 2, 1) + 2 * 2)  # conv_out, quant_conv, LayerNorm
    want_decoder = (conv(2, 3, 1) + conv(3, 8, 3)  # post_quant_conv, conv_in
                    + residual(8, 8) + attention(8) + residual(8, 8)  # middle
                    + 2 * (residual(8, 8) + attention(8)) + conv(8, 8, 3)  # level 1 (2 blocks), the x2 conv
                    + residual(8, 4) + residual(4, 4)  # level 0
                    + group_norm(4) + conv(4, 1, 3))  # conv_out
    assert (want_encoder, want_decoder) == (4699, 7386)
    assert sum(p.numel() for p in encoder.parameters()) == want_encoder
    assert sum(p.numel() for p in decoder.parameters()) == want_decoder


def test_the_memory_check_sizes_the_network_as_built():
    # Blocks past each level's first are extrapolated from 1 and 2 (mqvae.config.feasibility); against the real
    # 3-block network, every leaf module's new output counted (the softmax's positions^2 weights included).
    cfg = tiny_config(model={**DIGITS_VQGAN, "num_res_blocks": 3, "attn_resolutions": [16, 8]})
    model = build_model(cfg, 1, 10, 16).eval()
    outputs = []
    for leaf in model.modules():
        if next(leaf.children(), None) is None:
            leaf.register_forward_hook(lambda m, inputs, out: outputs.append(0 if any(out is x for x in inputs)
                                                                             else out.numel()))
    halves = nn.ModuleList([model.encoder, model.decoder])
    with torch.no_grad():
        model.decoder(model.encoder(torch.rand(1, 1, 16, 16)))
    size = network_size(cfg, 1, 16, 10)
    assert size.parameters == sum(p.numel() for p in halves.parameters())
    assert size.activations == sum(outputs) and size.positions == 8 * 8


# -- quant_conv and the LayerNorm of z ------------------------------------------------------------------------

def test_quant_conv_maps_z_channels_to_the_code_dim_and_back():
    cfg = small(ch_mult=[1, 2], attn_resolutions=[], z_channels=6, z_norm="none")
    encoder, decoder = VQGANEncoder(1, cfg, 4, 16), VQGANDecoder(1, cfg, 4, 16)
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        h = encoder.net(x)
        assert h.shape[1] == 6 and encoder.quant_conv.weight.shape == (4, 6, 1, 1)
        torch.testing.assert_close(encoder(x), torch.einsum("oc,bchw->bohw", encoder.quant_conv.weight[:, :, 0, 0], h)
                                   + encoder.quant_conv.bias[:, None, None])
        z = encoder(x)
        assert decoder.post_quant_conv(z).shape[1] == 6 and decoder.net[0].in_channels == 6

    off = dataclasses.replace(cfg, quant_conv=False, z_channels=None)
    encoder, decoder = VQGANEncoder(1, off, 4, 16), VQGANDecoder(1, off, 4, 16)
    assert isinstance(encoder.quant_conv, nn.Identity) and isinstance(decoder.post_quant_conv, nn.Identity)
    with torch.no_grad():
        assert torch.equal(encoder(x), encoder.net(x)) and encoder(x).shape[1] == 4
    assert not any("quant_conv" in name for name, _ in [*encoder.named_parameters(), *decoder.named_parameters()])


def test_the_layer_norm_normalises_each_latent_vector_over_its_channels():
    torch.manual_seed(0)
    norm = ChannelLayerNorm(5)
    x = 3 + 2 * torch.randn(2, 5, 3, 4)
    with torch.no_grad():
        y = norm(x)
    # At its initial scale 1 and bias 0: each position's 5 channels have mean 0 and variance v / (v + eps).
    assert y.mean(1).abs().max() < 1e-6
    v = x.double().var(1, unbiased=False)
    torch.testing.assert_close(y.double().var(1, unbiased=False), v / (v + 1e-5), rtol=1e-5, atol=1e-6)
    # With a scale and a bias: the float64 formula.
    with torch.no_grad():
        norm.weight.copy_(torch.randn(5))
        norm.bias.copy_(torch.randn(5))
        y = norm(x)
    xd = x.double()
    want = (xd - xd.mean(1, keepdim=True)) / torch.sqrt(xd.var(1, unbiased=False, keepdim=True) + 1e-5)
    want = want * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None]
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("z_norm", ["none", "layer"])
def test_z_norm_applies_after_quant_conv(z_norm):
    torch.manual_seed(5)
    cfg = small(ch_mult=[1, 2], attn_resolutions=[], z_channels=6, z_norm=z_norm)
    encoder = VQGANEncoder(1, cfg, 4, 16)
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        before = encoder.quant_conv(encoder.net(x))
        z = encoder(x)
    if z_norm == "none":
        assert isinstance(encoder.z_norm, nn.Identity) and torch.equal(z, before)
    else:
        assert encoder.z_norm.normalized_shape == (4,)
        # The LayerNorm's formula in float64 on quant_conv's output: a unit-variance check alone failed at random
        # inputs whose channel variance is near LayerNorm's eps (var / (var + eps) is then visibly below 1).
        b = before.double()
        want = (b - b.mean(1, keepdim=True)) / torch.sqrt(b.var(1, unbiased=False, keepdim=True) + 1e-5)
        torch.testing.assert_close(z.double(), want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(z, before)


# -- the decoders' last layer --------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [{}, DIGITS_VQGAN], ids=["vqvae", "vqgan"])
def test_last_layer_is_the_weight_of_the_decoders_final_convolution(model):
    net = build_model(tiny_config(model=model), 1, 10, 16)
    convolutions = [m for m in net.decoder.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert net.last_layer() is net.decoder.last_layer is convolutions[-1].weight
    assert isinstance(net.last_layer(), nn.Parameter)
    # It is the output's last layer: zeroed with its bias, the output is zero.
    with torch.no_grad():
        convolutions[-1].weight.zero_()
        convolutions[-1].bias.zero_()
        assert net(torch.rand(2, 1, 16, 16)).output.abs().max() == 0


def test_a_decoder_without_last_layer_is_one_line():
    net = build_model(tiny_config(), 1, 10, 16)
    bare = QuantizedNetwork(net.encoder, net.quantizer, nn.Sequential(net.decoder), net.task)
    assert isinstance(net.decoder, Decoder)
    one_line_error(bare.last_layer, "has no last_layer", "Sequential")


# -- training through the engine -------------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [[{"name": "vqvae", "problem": "VQVAE", "weight_decay": 0.0}], two_levels()],
                         ids=["vqvae", "mqvae"])
def test_two_iterations_train_on_the_digits(tmp_path, levels):
    engine = tiny_engine(tmp_path, levels=levels, model=DIGITS_VQGAN, quantizer={"kmeans_warmup": 0})
    model = engine.model
    assert isinstance(model.encoder, VQGANEncoder) and isinstance(model.encoder.z_norm, ChannelLayerNorm)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    engine.run()
    assert engine.global_step == 2
    records = [r for r in measured(tmp_path) if any(k.endswith(".loss") for k in r)]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(v) for r in records for k, v in r.items() if k.endswith(".loss"))
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    # Both ends of each half (quant_conv and the LayerNorm's scale included), attention, and the codebook.
    last = f"decoder.net.{len(model.decoder.net) - 1}.weight"
    for name in ("encoder.net.0.weight", "encoder.quant_conv.weight", "encoder.z_norm.weight", "decoder.net.0.weight",
                 "decoder.post_quant_conv.weight", last, "quantizer.codebook"):
        assert name in moved, name
    assert any(".q." in name for name in moved) and model.get_parameter(last) is model.last_layer()
    if len(levels) == 2:
        stats = engine.codebook.hypergradient_stats()
        assert stats["implicit_norm"] > 0  # Eq. 13's term reaches the codebook through the VQ-GAN


# -- refusals --------------------------------------------------------------------------------------------------

def load(model=None, **top):
    return lambda: tiny_config(model=model, **top)


@pytest.mark.parametrize("model, needles", [
    ({"ch_mult": [1, 2]}, ["model.ch_mult: [1, 2] is read by model.kind vqgan only, not by kind 'vqvae'"]),
    ({"z_norm": "none"}, ["model.z_norm", "vqgan only"]),
    ({**DIGITS_VQGAN, "downsample": 3}, ["model.downsample: 3 is read by model.kind vqvae only, not by kind 'vqgan'"]),
    ({**DIGITS_VQGAN, "res_channels": 4}, ["model.res_channels", "vqvae only"]),
    ({**DIGITS_VQGAN, "norm": "batch"}, ["model.norm: 'batch'", "vqvae only"]),
    ({**DIGITS_VQGAN, "sync_batch_norm": True}, ["model.sync_batch_norm", "vqvae, resnet18 only"]),
    ({"kind": "resnet18", "hidden_channels": 8}, ["model.hidden_channels: 8", "not by kind 'resnet18'"]),
    ({**DIGITS_VQGAN, "norm_groups": 16}, ["model.norm_groups: 16 does not divide", "8, 16)"]),
    ({**DIGITS_VQGAN, "hidden_channels": 6}, ["model.norm_groups: 4 does not divide", "6, 12)"]),
    ({**DIGITS_VQGAN, "ch_mult": []}, ["model.ch_mult", "one positive multiple"]),
    ({**DIGITS_VQGAN, "ch_mult": [1, 0]}, ["model.ch_mult", "[1, 0]"]),
    ({**DIGITS_VQGAN, "attn_resolutions": [0]}, ["model.attn_resolutions"]),
    ({**DIGITS_VQGAN, "num_res_blocks": 0}, ["model.num_res_blocks", "at least 1"]),
    ({**DIGITS_VQGAN, "quant_conv": False, "z_channels": 8}, ["model.z_channels: 8 with model.quant_conv: false",
                                                               "quantizer.dim = 4"]),
    ({**DIGITS_VQGAN, "dropout": 0.1}, ["model.dropout: 0.1 with a level below another", "Eq. 13"]),
])
def test_a_setting_the_kind_cannot_use_is_one_line_at_load(model, needles):
    one_line_error(load(model), "<test>: ", *needles)


def test_what_stays_allowed():
    tiny_config(model={**DIGITS_VQGAN, "quant_conv": False, "z_channels": 4})  # the code dim itself
    tiny_config(model={**DIGITS_VQGAN, "dropout": 0.1}, levels=[{"name": "vqvae", "problem": "VQVAE"}])
    tiny_config(model={**DIGITS_VQGAN, "dropout": 0.1}, hypergradient={"xi": 0})  # no finite difference
    tiny_config(model={**DIGITS_VQGAN, "res_channels": 32, "downsample": 2})  # the defaults a shared base may set


def test_what_the_images_decide_is_one_line_before_anything_is_built():
    # Attention at a side no level has, and more stride-2 stages than the 16-px side halves.
    for model, needles in (({**DIGITS_VQGAN, "attn_resolutions": [4]}, ["model.attn_resolutions: 4 is the side of no "
                                                                        "level for 16-px images", "16, 8"]),
                           ({**DIGITS_VQGAN, "ch_mult": [1] * 6, "attn_resolutions": []},
                            ["model.ch_mult: 5 stride-2 stages do not fit the 16-px images", "2^4 at most"])):
        cfg = tiny_config(model=model)
        one_line_error(lambda: check_feasible(cfg, 1, 16, 10, CPU), *needles)
