"""3D encoders for vertebra crops. GroupNorm only (BatchNorm breaks Opacus per-sample gradients)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from osteo_model.errors import ConfigError

IN_CHANNELS = 2
"""Input channels: normalised HU and the vertebra mask (so the network knows body vs core vs outside)."""


CORE_MASK_LEVEL = 0.75
"""Mask channel value above which a voxel is trabecular core (dataset: core 1.0, body 0.5)."""
CHANNELS_PER_GROUP = 4


def _groups(channels: int) -> int:
    """GroupNorm groups of at least 4 channels: per-channel groups (InstanceNorm) would erase each
    channel's mean, and with it the crop's absolute density that BMD depends on."""
    return max(1, channels // CHANNELS_PER_GROUP) if channels % CHANNELS_PER_GROUP == 0 else 1


class SmallCNN(nn.Module):
    """Four conv blocks (conv-GN-ReLU; stride-2 downsampling from the second block on), pooled at every
    scale.

    The first block works at full resolution, so fine trabecular texture is seen before any pooling.
    Each block's feature maps are averaged over the whole crop and over the trabecular core (mask
    channel), and all of them form the embedding: the fine-scale texture filters reach the heads
    directly, which is both the texture-preserving path and what lets training start quickly (through
    four randomly initialised blocks alone, crop-to-crop differences arrive ~100x attenuated).
    """

    def __init__(self, channels: Sequence[int], embed_dim: int, in_channels: int = IN_CHANNELS) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(channels):
            layers = [nn.Conv3d(prev, ch, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(_groups(ch), ch), nn.ReLU()]
            if i >= 2:
                layers += [nn.Conv3d(ch, ch, 3, padding=1), nn.GroupNorm(_groups(ch), ch), nn.ReLU()]
            blocks.append(nn.Sequential(*layers))
            prev = ch
        self.blocks = nn.ModuleList(blocks)
        self.proj = nn.Linear(2 * sum(channels), embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        core_mask = (x[:, 1:2] > CORE_MASK_LEVEL).to(x.dtype)
        pooled, h = [], x
        for block in self.blocks:
            h = block(h)
            core = F.adaptive_avg_pool3d(core_mask, h.shape[2:])
            pooled += [h.mean((2, 3, 4)), (h * core).sum((2, 3, 4)) / core.sum((2, 3, 4)).clamp(min=1e-6)]
        return torch.relu(self.proj(torch.cat(pooled, 1)))


def _monai_resnet10(channels: Sequence[int], embed_dim: int, in_channels: int = IN_CHANNELS) -> nn.Module:
    """MONAI ResNet-10 (``resnet10``'s block layout, our channel widths) with GroupNorm; its final fc layer
    becomes the embedding projection."""
    from monai.networks.nets import ResNet
    from monai.networks.nets.resnet import ResNetBlock
    from opacus.validators import ModuleValidator

    net = ResNet(
        block=ResNetBlock,
        layers=[1, 1, 1, 1],  # ResNet-10
        spatial_dims=3,
        n_input_channels=in_channels,
        num_classes=embed_dim,
        block_inplanes=list(channels),
        conv1_t_size=3,
        conv1_t_stride=1,
        norm=("group", {"num_groups": 8}),
        act=("relu", {"inplace": False}),
    )
    # MONAI 1.6 does not pass `norm` on to the residual layers (they get BatchNorm): Opacus's validator
    # swaps every BatchNorm for GroupNorm.
    net = ModuleValidator.fix(net)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    return net


def build_encoder(model_cfg) -> nn.Module:
    """Encoder named by ``model.encoder``: ``small_cnn`` (CPU default) or ``resnet10`` (GPU)."""
    name = str(model_cfg.encoder)
    if name == "small_cnn":
        return SmallCNN(model_cfg.channels, int(model_cfg.embed_dim))
    if name == "resnet10":
        return nn.Sequential(_monai_resnet10(model_cfg.channels, int(model_cfg.embed_dim)), nn.ReLU())
    raise ConfigError(None, f"model.encoder={name!r}: expected small_cnn or resnet10")
