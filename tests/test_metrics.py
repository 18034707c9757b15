"""Metrics against independent references: float64 formulas over Python floats, explicit autograd, scipy."""

import math
import os
from collections import Counter

import numpy as np
import pytest
import scipy.linalg
import torch
import torchmetrics.functional.image.lpips as tm_lpips
from torch import nn

from mqvae.evaluation import metrics
from mqvae.evaluation.metrics import LPIPS_MIN_SIDE, SCALES, ImageQuality, active_codes, gradient_gap, perplexity


# ---------------------------------------------------------------- codebook usage


def test_active_codes_are_the_codes_a_python_counter_sees():
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 7, (4, 5, 5), generator=g)
    counter = Counter(indices.flatten().tolist())
    counts = torch.bincount(indices.flatten(), minlength=10)
    assert active_codes(counts) == len(counter)


def _perplexity_reference(counts):
    total = float(sum(counts))
    entropy = -sum((c / total) * math.log2(c / total) for c in counts if c > 0)
    return 2.0**entropy


def test_perplexity_matches_float64_entropy_formula_with_unused_codes():
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        counts = torch.randint(0, 50, (64,), generator=g)
        counts[torch.randperm(64, generator=g)[:20]] = 0
        assert perplexity(counts) == pytest.approx(_perplexity_reference(counts.tolist()), rel=1e-12)


def test_perplexity_extremes():
    assert perplexity(torch.full((37,), 5)) == pytest.approx(37.0, rel=1e-12)
    one_hot = torch.zeros(37, dtype=torch.int64)
    one_hot[3] = 11
    assert perplexity(one_hot) == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError):
        perplexity(torch.zeros(4))


def test_scales_are_mqvae_table3_factors():
    assert SCALES == {"mse": 1e-3, "lpips": 1e-1, "gradient_gap": 1e-5}


# ---------------------------------------------------------------- gradient gap


def _vq_setup():
    g = torch.Generator().manual_seed(2)
    encoder = nn.Conv2d(3, 4, 3, padding=1).double()
    decoder = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 3, 3, padding=1)).double()
    x = torch.rand(2, 3, 6, 6, generator=g, dtype=torch.float64)
    codebook = torch.randn(5, 4, generator=g, dtype=torch.float64)
    z_e = encoder(x)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(flat, codebook).argmin(dim=1)
    z_q = codebook[nearest].reshape(2, 6, 6, 4).permute(0, 3, 1, 2)
    return encoder, decoder, x, z_e, z_q


def test_gradient_gap_matches_two_explicit_forward_passes():
    encoder, decoder, x, z_e, z_q = _vq_setup()

    def task_loss(out):
        return ((out - x) ** 2).mean()

    # Non-quantized model: gradient of L(G(z_e)) w.r.t. the encoder output.
    leaf = z_e.detach().clone().requires_grad_(True)
    (g_cont,) = torch.autograd.grad(task_loss(decoder(leaf)), leaf)
    # Quantized model with the straight-through estimator, differentiated w.r.t. the same encoder output.
    leaf = z_e.detach().clone().requires_grad_(True)
    z_q_st = leaf + (z_q - leaf).detach()
    (g_ste,) = torch.autograd.grad(task_loss(decoder(z_q_st)), leaf)
    reference = math.sqrt(sum((a - b) ** 2 for a, b in zip(g_cont.flatten().tolist(), g_ste.flatten().tolist())))

    gap = gradient_gap(decoder, task_loss, z_e, z_q)
    assert reference > 0
    assert float(gap) == pytest.approx(reference, rel=1e-10)
    for p in list(encoder.parameters()) + list(decoder.parameters()):
        assert p.grad is None


def test_gradient_gap_is_zero_without_quantization_error_and_works_under_no_grad():
    _, decoder, x, z_e, z_q = _vq_setup()

    def task_loss(out):
        return ((out - x) ** 2).mean()

    assert float(gradient_gap(decoder, task_loss, z_e, z_e.clone())) == 0.0
    with torch.no_grad():
        gap = gradient_gap(decoder, task_loss, z_e, z_q)
    assert float(gap) > 0


# ---------------------------------------------------------------- image quality, real networks


def _measured_or_explained(out, name):
    value, reason = out[name], out[f"{name}_reason"]
    if value is None:
        assert isinstance(reason, str) and reason.strip() and "\n" not in reason
    else:
        assert reason is None and isinstance(value, float) and math.isfinite(value)


def test_real_networks_give_a_value_or_a_one_line_reason():
    quality = ImageQuality("cpu")  # from the local cache only: no download is attempted
    g = torch.Generator().manual_seed(3)
    real = torch.rand(4, 1, 32, 32, generator=g)
    quality.update(real, (real + 0.05).clamp(0, 1))
    out = quality.compute()
    assert set(out) == {"fid", "fid_reason", "is", "is_reason", "lpips", "lpips_reason"}
    for name in ("fid", "is", "lpips"):
        _measured_or_explained(out, name)


@pytest.mark.parametrize("error", [OSError("no route to host"), RuntimeError("bad checkpoint"),
                                   ModuleNotFoundError("No module named 'scipy'")])
def test_networks_that_cannot_load_give_null_with_a_one_line_reason(monkeypatch, tmp_path, error):
    def fails(*args, **kwargs):
        raise error

    for network in ("FrechetInceptionDistance", "InceptionScore", "LpipsNetwork"):
        monkeypatch.setattr(metrics, network, fails)
    # Weights "in the cache", so that construction is attempted (with or without torch-fidelity installed).
    monkeypatch.setattr(metrics, "inception_url", lambda: "https://example.invalid/inception.pth")
    (tmp_path / "weights.pth").write_bytes(b"")
    monkeypatch.setattr(metrics, "cached_weights", lambda url: tmp_path / "weights.pth")
    quality = ImageQuality("cpu")
    real = _blobs(4, 32, seed=3)
    quality.update(real, real)
    out = quality.compute()
    for name in ("fid", "is", "lpips"):
        assert out[name] is None
        assert str(error) in out[f"{name}_reason"] and "\n" not in out[f"{name}_reason"]


# ---------------------------------------------------------------- image quality, stand-in networks


class FidFeature(nn.Module):
    """64-d features: conv, global pooling to 2×2, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        # Scaled up so that FID values are O(1) rather than O(1e-4).
        return 10 * self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


class RecordingLogits(nn.Module):
    """10 IS logits; remembers every batch it was shown."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 10)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return 5 * self.fc(x.mean(dim=(2, 3)))


class LpipsBackbone(nn.Module):
    """Five feature maps with AlexNet's channel counts, at halving resolutions."""

    channels = (64, 192, 384, 256, 256)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.heads = nn.ModuleList(nn.Conv2d(8, c, 1) for c in self.channels)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        outs = []
        for i, head in enumerate(self.heads):
            h = nn.functional.avg_pool2d(h, 2) if i else h  # 32 px: 16, 8, 4, 2, 1
            outs.append(head(h))
        return outs


def _blobs(n, size, seed):
    """Smooth, structured images in [0, 1] (unlike uniform noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")


def _stand_in_quality():
    """An ImageQuality with stand-in networks, and the networks (FID features, IS logits, LPIPS backbone)."""
    torch.manual_seed(4)
    networks = FidFeature(), RecordingLogits(), LpipsBackbone()
    fid, is_, lpips = networks
    return ImageQuality("cpu", fid_feature=fid, is_feature=is_, lpips_net=lpips), networks


def _fid_reference(net, real, fake):
    with torch.no_grad():
        f_real, f_fake = (net(x).double().numpy() for x in (real, fake))
    mu_r, mu_f = f_real.mean(0), f_fake.mean(0)
    cov_r, cov_f = np.cov(f_real, rowvar=False), np.cov(f_fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_r @ cov_f).real
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r + cov_f - 2 * covmean))


def _lpips_reference(backbone, real, fake):
    """Zhang et al. 2018 LPIPS in float64 with the linear weights torchmetrics ships."""
    path = os.path.join(os.path.dirname(tm_lpips.__file__), "lpips_models", "alex.pth")
    weights = torch.load(path, map_location="cpu")
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    net = LpipsBackbone().double()
    net.load_state_dict(backbone.state_dict())

    def unit(f):
        return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)

    with torch.no_grad():
        f0, f1 = (net(((2 * x.double() - 1) - shift) / scale) for x in (real, fake))
    per_image = 0
    for k, (a, b) in enumerate(zip(f0, f1)):
        w = weights[f"lin{k}.model.1.weight"].double().view(1, -1, 1, 1)
        per_image = per_image + (w * (unit(a) - unit(b)) ** 2).sum(dim=1).mean(dim=(1, 2))
    return float(per_image.mean())


def test_stand_ins_match_independent_fid_and_lpips_references():
    quality, (fid, _, lpips) = _stand_in_quality()
    real = _blobs(200, 64, seed=5)
    fake = (real + 0.1 * torch.randn(real.shape, generator=torch.Generator().manual_seed(6))).clamp(0, 1)
    for batch in range(0, 200, 50):  # accumulation over a test set
        quality.update(real[batch : batch + 50], fake[batch : batch + 50])
    out = quality.compute()

    assert out["fid_reason"] is None and out["lpips_reason"] is None and out["is_reason"] is None
    assert out["fid"] == pytest.approx(_fid_reference(fid, real, fake), rel=1e-6)
    assert out["lpips"] > 0
    assert out["lpips"] == pytest.approx(_lpips_reference(lpips, real, fake), rel=1e-5)
    assert 1.0 <= out["is"] <= 10.0


def test_stand_in_fid_is_zero_against_itself_and_positive_against_noise():
    quality, _ = _stand_in_quality()
    real = _blobs(200, 32, seed=7)
    quality.update(real, real)
    same = quality.compute()
    assert abs(same["fid"]) < 1e-6
    assert same["lpips"] == 0.0

    quality, _ = _stand_in_quality()
    quality.update(real, torch.rand(real.shape, generator=torch.Generator().manual_seed(8)))
    noise = quality.compute()
    assert noise["fid"] > 1e-3
    assert noise["lpips"] > 0


def test_grayscale_images_are_made_rgb_and_is_sees_clamped_reconstructions_only():
    quality, (_, is_logits, _) = _stand_in_quality()
    real = _blobs(20, 32, seed=9)[:, :1]
    fake = real * 1.5  # decoder output overshooting [0, 1]
    quality.update(real, fake)
    out = quality.compute()
    assert all(math.isfinite(out[name]) for name in ("fid", "is", "lpips"))

    (seen,) = is_logits.seen
    assert seen.dtype == torch.float32 and seen.shape == (20, 3, 32, 32)
    torch.testing.assert_close(seen, fake.clamp(0, 1).expand(-1, 3, -1, -1), rtol=0, atol=0)


class RecordingBackbone(LpipsBackbone):
    """LpipsBackbone that remembers the spatial size of every batch LPIPS hands it."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return super().forward(x)


@pytest.mark.parametrize("side", [32, 64])
def test_lpips_runs_at_the_images_own_size(side):
    # torchmetrics' LearnedPerceptualImagePatchSimilarity does not resize; neither does ImageQuality.
    backbone = RecordingBackbone()
    quality = ImageQuality("cpu", fid_feature=FidFeature(), is_feature=RecordingLogits(), lpips_net=backbone)
    real = _blobs(6, side, seed=11)
    fake = (real + 0.1).clamp(0, 1)
    quality.update(real, fake)
    out = quality.compute()
    assert backbone.sizes == [(side, side), (side, side)]  # real and fake, at the data set's size
    assert out["lpips_reason"] is None
    assert out["lpips"] == pytest.approx(_lpips_reference(backbone, real, fake), rel=1e-5)


@pytest.mark.parametrize("side", [28, 16])
def test_lpips_is_null_with_the_reason_below_alexnets_minimum_size(side):
    # 28: MNIST / Fashion-MNIST; 16: the embedded digits. FID and IS are still measured.
    backbone = RecordingBackbone()
    quality = ImageQuality("cpu", fid_feature=FidFeature(), is_feature=RecordingLogits(), lpips_net=backbone)
    real = _blobs(6, side, seed=12)
    quality.update(real, (real + 0.1).clamp(0, 1))
    out = quality.compute()
    assert out["lpips"] is None and backbone.sizes == []
    assert f"cannot take {side}x{side} images" in out["lpips_reason"] and "\n" not in out["lpips_reason"]
    assert math.isfinite(out["fid"]) and math.isfinite(out["is"])


def test_lpips_minimum_size_is_torchmetrics_alexnets():
    """The size rule is AlexNet's own (random weights, same layers as torchmetrics' LPIPS backbone): the smallest
    side it takes is LPIPS_MIN_SIDE; one pixel less and torch's max-pool raises."""
    alexnet = tm_lpips.Alexnet(pretrained=False)
    features = alexnet(torch.zeros(1, 3, LPIPS_MIN_SIDE, LPIPS_MIN_SIDE))
    assert [tuple(f.shape[-2:]) for f in features] == [(7, 7), (3, 3), (1, 1), (1, 1), (1, 1)]
    for side in (LPIPS_MIN_SIDE - 1, 28, 16, 8):
        with pytest.raises(RuntimeError, match="Output size is too small"):
            alexnet(torch.zeros(1, 3, side, side))


def test_real_images_outside_unit_range_are_rejected():
    quality, _ = _stand_in_quality()
    with pytest.raises(ValueError):
        quality.update(_blobs(4, 32, seed=10) * 2 - 1, _blobs(4, 32, seed=10))


def test_code_rate_by_hand():
    from mqvae.evaluation.metrics import code_rate

    # 2 groups of 4 codes: group 0 uses one code (0 bits), group 1 its four equally (2 bits).
    rate = code_rate(torch.tensor([4, 0, 0, 0, 1, 1, 1, 1]), groups=2)
    assert rate["rate_bits"] == 4.0  # 2 * log2(4)
    assert rate["entropy_bits"] == pytest.approx(2.0)
    assert rate["perplexity_per_group"] == [pytest.approx(1.0), pytest.approx(4.0)]
    assert rate["active_codes_per_group"] == [1, 4]
    # One group of 8: log2(8) bits can be held; p = (1/2, 1/6, 1/6, 1/6) carries H = 1/2 + 3 * log2(6) / 6 bits.
    rate = code_rate(torch.tensor([3, 1, 1, 1, 0, 0, 0, 0]), groups=1)
    assert rate["rate_bits"] == 3.0
    assert rate["entropy_bits"] == pytest.approx(0.5 + 0.5 * math.log2(6))
    # A group whose codes the test set never chose has no perplexity and adds no bits.
    rate = code_rate(torch.tensor([0, 0, 2, 2]), groups=2)
    assert rate["perplexity_per_group"][0] is None and rate["entropy_bits"] == pytest.approx(1.0)
