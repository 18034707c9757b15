"""ResNet-18 split around the quantizer, for the classification task (Huh et al. §5.1; MQ-VAE §5.3).

``resnet18_halves`` cuts torchvision's ``resnet18(weights=None)`` after ``layer2``: the encoder is
the stem, ``layer1`` and ``layer2`` (128 channels, 1/2 of the input side) followed by a 1x1 convolution
to the quantizer's code dimension; the decoder is a 1x1 convolution back to 128 channels, ``layer3``,
``layer4``, global average pooling and the linear head.

Small inputs. The ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool) would shrink a 16x16 digit to
4x4 before ``layer1`` and to 1x1 at ``layer4``, so the stem is the usual CIFAR ResNet one: a 3x3 stride-1
convolution, no max-pool (He et al. 2016, §4.2; the stem Huh et al.'s CIFAR classifiers use). Everything
else is torchvision's ResNet-18 unchanged; no pretrained weights are loaded.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18

# ResNet-18 widths at the cut: layer2 outputs 128 channels.
_CUT_CHANNELS = 128


def resnet18_halves(in_channels: int, num_classes: int, dim: int) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) of a ResNet-18 quantized after ``layer2``.

    encoder: N x in_channels x H x W -> N x dim x H/2 x W/2; decoder: N x dim x h x w -> N x num_classes logits.
    """
    net = resnet18(weights=None, num_classes=num_classes)
    stem = [nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False), net.bn1, net.relu]
    encoder = nn.Sequential(*stem, net.layer1, net.layer2, nn.Conv2d(_CUT_CHANNELS, dim, 1))
    decoder = nn.Sequential(nn.Conv2d(dim, _CUT_CHANNELS, 1), net.layer3, net.layer4, net.avgpool, nn.Flatten(), net.fc)
    return encoder, decoder
