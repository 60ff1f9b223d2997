"""The CIFAR-stem ResNet-18 used by SimCLR and BadEncoder victims, built from timm's ResNet."""

from __future__ import annotations

from timm.models.resnet import BasicBlock, ResNet
from torch import nn


def cifar_resnet18(width: int = 64, in_chans: int = 3) -> nn.Module:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool: (N, in_chans, H, W) -> (N, 8 * width) features.

    Stages have (w, 2w, 4w, 8w) channels; the output is the global average pool (no classifier), 512-d for
    the usual width 64. Parameter names match torchvision's ResNet (conv1, bn1, layer1.0.conv1, ...).
    """
    if not isinstance(width, int) or width <= 0:
        raise ValueError(f"width must be a positive int, got {width!r}")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
    model = ResNet(block=BasicBlock, layers=(2, 2, 2, 2), channels=(width, 2 * width, 4 * width, 8 * width),
                   stem_width=width, in_chans=in_chans, num_classes=0, global_pool="avg")
    model.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    if model.bn1.num_features != width:
        # timm's plain stem is always 64 wide, whatever stem_width says; at other widths rebuild the stem
        # norm and the first block (which timm gave a 64 -> width downsample) so the stem is `width` wide.
        model.bn1 = nn.BatchNorm2d(width)
        model.layer1[0] = BasicBlock(width, width)
        model.feature_info[0]["num_chs"] = width
    model.init_weights(zero_init_last=True)  # same init for the replaced modules as for the rest
    return model
