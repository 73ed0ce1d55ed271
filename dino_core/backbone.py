"""Image backbones through timm (``features_only``): ResNet with frozen BatchNorm, and Swin.

Swin runs with the windowing of the official Swin detection release (pad the map to a multiple of the
window, then shift; the shifted-window mask is built for the padded map) and with a LayerNorm on every
returned stage, so official DINO-Swin checkpoints give the official outputs. timm itself shifts before
padding, which changes every window on maps that are not a multiple of the window size.

Images of a batch that differ in size run through the backbone one at a time at their own size and
their features are zero-padded afterwards: convolutions, normalisations and windows then never see
another image's padding, which is what makes a detection independent of the batch it was in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import nn
from torch.utils.checkpoint import checkpoint


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, the checkpoint keys of
    ``nn.BatchNorm2d`` less ``num_batches_tracked``): (B, C, H, W) -> (B, C, H, W).

    One ``batch_norm`` call in inference mode, one kernel forward and one backward, where the usual
    ``x * scale + shift`` recomputes the scale and shift from the statistics at every call (six kernels
    per layer, 53 layers in a ResNet-50, on a step that the GPU's kernel launches bound).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W), in x's dtype."""
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm2d`` inside it replaced by a :class:`FrozenBatchNorm2d` holding
    its statistics and affine parameters."""
    if type(module) is nn.BatchNorm2d:  # not subclasses such as timm's BatchNormAct2d (norm + activation)
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        frozen.weight.copy_(module.weight.detach())
        frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        replaced = freeze_batch_norm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


class _DetectionWindowBlock(SwinTransformerBlock):
    """A timm Swin block with the detection release's windowing (pad first, then shift)."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, H, W, C) -> (B, H, W, C)
        _, height, width, channels = x.shape
        win_h, win_w = self.window_size
        x = F.pad(x, (0, 0, 0, (win_w - width % win_w) % win_w, 0, (win_h - height % win_h) % win_h))
        _, padded_h, padded_w, _ = x.shape
        shifted = any(self.shift_size)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        mask = self.get_attn_mask(x) if shifted else None
        windows = self.attn(windows, mask=mask).view(-1, win_h, win_w, channels)
        x = window_reverse(windows, self.window_size, padded_h, padded_w)
        if shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :height, :width, :].contiguous()


class _GroupNorm(nn.GroupNorm):
    """GroupNorm with the largest group count up to 32 that divides the channels (He et al., "Rethinking
    ImageNet Pre-training": what lets a detector's backbone train from scratch at a few images per batch)."""

    def __init__(self, num_channels: int, **_: object) -> None:
        super().__init__(math.gcd(32, num_channels), num_channels)


@dataclass
class WeightLoadReport:
    """What loading a backbone weight file did."""

    loaded: int
    layout: str
    ignored: list[str] = field(default_factory=list)
    """Keys of the file that the detector does not use (classification head, final norm)."""
    kept_initial: list[str] = field(default_factory=list)
    """Backbone parameters the file does not provide (the detection-only output norms)."""


class Backbone(nn.Module):
    """A timm feature extractor returning the last ``num_stages`` stages as NCHW maps.

    Args:
        name: timm architecture (``resnet*`` or ``swin*``).
        num_stages: how many of the last stages to return (1-4).
        frozen_stages: stem and the first ``frozen_stages`` stages get no gradient (-1: none).
        drop_path_rate: stochastic depth for Swin.
        norm: ResNet normalisation, ``frozen_bn`` (ImageNet weights) or ``group_norm`` (from scratch).
    """

    def __init__(
        self,
        name: str,
        num_stages: int,
        frozen_stages: int,
        drop_path_rate: float = 0.0,
        norm: str = "frozen_bn",
    ) -> None:
        super().__init__()
        if not 1 <= num_stages <= 4:
            raise ValueError(f"a backbone returns 1 to 4 stages, got {num_stages}")
        self.name = name
        self.is_swin = name.startswith("swin")
        stages = tuple(range(4 - num_stages, 4))
        if self.is_swin:
            body = timm.create_model(
                name,
                pretrained=False,
                features_only=True,
                out_indices=stages,
                strict_img_size=False,
                always_partition=True,
                drop_path_rate=drop_path_rate,
            )
            for module in body.modules():
                if isinstance(module, SwinTransformerBlock):
                    module.__class__ = _DetectionWindowBlock
            self.patch_size = body.patch_embed.patch_size
            self.stage_names = [f"layers_{i}" for i in range(4)]
        elif name.startswith("resnet"):
            # timm stage index 0 is the stem, 1-4 are layer1-layer4.
            body = timm.create_model(
                name,
                pretrained=False,
                features_only=True,
                out_indices=tuple(i + 1 for i in stages),
                zero_init_last=False,
                drop_path_rate=drop_path_rate,
                **({"norm_layer": _GroupNorm} if norm == "group_norm" else {}),
            )
            if norm == "frozen_bn":
                # Detection batches are too small for batch statistics: BatchNorm is an affine map.
                body = freeze_batch_norm(body)
            self.patch_size = (1, 1)
            self.stage_names = [f"layer{i + 1}" for i in range(4)]
        else:
            raise ValueError(
                f"model.backbone.name must be a timm resnet* or swin* architecture, got {name!r}"
            )
        missing = [n for n in self.stage_names[: max(stages) + 1] if n not in dict(body.named_children())]
        if missing:  # e.g. timm's resnetv2_*: other stage names, pre-activation BatchNormAct2d
            raise ValueError(
                f"model.backbone.name={name!r} has no stages named {missing}: use a timm ResNet "
                "(resnet18, resnet50, resnet10t, ...) or Swin (swin_*) architecture"
            )
        self.body = body
        self.return_stages = stages
        self.num_channels: list[int] = list(body.feature_info.channels())
        self.strides: list[int] = list(body.feature_info.reduction())
        if self.is_swin:
            # The detection release normalises every returned stage (keys norm{i}).
            self.out_norms = nn.ModuleDict(
                {str(i): nn.LayerNorm(c) for i, c in zip(stages, self.num_channels)}
            )
        self.checkpointing = False
        self._freeze(frozen_stages)

    def _freeze(self, frozen_stages: int) -> None:
        if frozen_stages < 0:
            return
        frozen_prefixes = [name for name in self.body if name not in self.stage_names]
        frozen_prefixes += self.stage_names[:frozen_stages]
        for name, parameter in self.body.named_parameters():
            if name.split(".")[0] in frozen_prefixes:
                parameter.requires_grad_(False)

    def _checkpointed_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # Block by block, as the official Swin release: recomputing a whole stage in the backward would
        # hold all its blocks' activations at once (18 blocks in Swin-L's third stage).
        blocks: nn.Module = stage
        if self.is_swin:
            x = stage.downsample(x)
            blocks = stage.blocks
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        # images (B, 3, H, W) of one size -> per returned stage (B, C_l, H_l, W_l)
        if self.is_swin:
            ph, pw = self.patch_size
            height, width = images.shape[-2:]
            images = F.pad(images, (0, (pw - width % pw) % pw, 0, (ph - height % ph) % ph))
        outputs = []
        x = images
        for name, module in self.body.items():
            if self.checkpointing and name in self.stage_names and self.training and torch.is_grad_enabled():
                x = self._checkpointed_stage(module, x)
            else:
                x = module(x)
            if name in self.body.return_layers:
                outputs.append(x)
        if self.is_swin:
            outputs = [
                norm(y).permute(0, 3, 1, 2).contiguous() for norm, y in zip(self.out_norms.values(), outputs)
            ]
        return outputs

    def forward(
        self, images: torch.Tensor, image_sizes: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the backbone on a padded batch.

        Args:
            images: (B, 3, H, W) normalised, zero-padded right/bottom.
            image_sizes: (B, 2) int64 (h, w) of each image before padding.

        Returns:
            features: per returned stage (B, C_l, H_l, W_l), zero outside each image's own map.
            valid_sizes: (B, num_stages, 2) int64 on the CPU, (h_l, w_l) of each image's own map per stage.
        """
        sizes = image_sizes.tolist()
        if all(h == images.shape[-2] and w == images.shape[-1] for h, w in sizes):
            features = self._features(images)
            valid = [[tuple(f.shape[-2:]) for f in features]] * len(sizes)
        else:
            per_image = [self._features(images[i : i + 1, :, :h, :w]) for i, (h, w) in enumerate(sizes)]
            valid = [[tuple(f.shape[-2:]) for f in feats] for feats in per_image]
            features = []
            for stage in range(len(per_image[0])):
                max_h = max(v[stage][0] for v in valid)
                max_w = max(v[stage][1] for v in valid)
                features.append(
                    torch.cat(
                        [
                            F.pad(f[stage], (0, max_w - f[stage].shape[-1], 0, max_h - f[stage].shape[-2]))
                            for f in per_image
                        ]
                    )
                )
        return features, torch.tensor(valid, dtype=torch.long)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> WeightLoadReport:
        """Load ImageNet weights: the official Swin release, timm's layout, or torchvision's ResNet.

        Raises:
            ValueError: listing missing and unexpected keys when the file does not fit this backbone.
        """
        converted, layout = self._convert(state_dict)
        ignored = [k for k in converted if k.split(".")[0] in ("head", "fc", "norm")]
        for key in ignored:
            converted.pop(key)
        own = self.state_dict()
        optional = {k for k in own if k.startswith("out_norms.")}
        missing = sorted(k for k in own if k not in converted and k not in optional)
        unexpected = sorted(k for k in converted if k not in own)
        mismatched = sorted(
            f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in converted.items()
            if k in own and v.shape != own[k].shape
        )
        if missing or unexpected or mismatched:
            raise ValueError(
                f"backbone weights ({layout} layout) do not fit {self.name}: "
                f"{len(missing)} missing {missing[:10]}, {len(unexpected)} unexpected {unexpected[:10]}, "
                f"{len(mismatched)} with another shape {mismatched[:5]}; "
                f"use a weights file made for {self.name} (train.backbone_weights in the pipeline)"
            )
        self.load_state_dict(converted, strict=False)
        kept = sorted(k for k in optional if k not in converted)
        return WeightLoadReport(loaded=len(converted), layout=layout, ignored=ignored, kept_initial=kept)

    def _convert(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
        state = {k.removeprefix("module."): v for k, v in state_dict.items()}
        state = {k: v for k, v in state.items() if not k.endswith(("relative_position_index", "attn_mask"))}
        if not self.is_swin:
            state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
            return {
                f"body.{k}" if k.split(".")[0] not in ("fc",) else k: v for k, v in state.items()
            }, "resnet"
        official = any(k.startswith("layers.0.downsample.") for k in state)
        converted: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "layers":
                stage = int(parts[1])
                if official and parts[2] == "downsample":
                    # The official release merges patches at the end of a stage, timm at the next's start.
                    stage += 1
                key = ".".join([f"body.layers_{stage}", *parts[2:]])
            elif parts[0] == "patch_embed":
                key = f"body.{key}"
            elif parts[0].startswith("norm") and parts[0][4:].isdigit():
                key = f"out_norms.{parts[0][4:]}.{'.'.join(parts[1:])}"
            converted[key] = value
        return converted, "official-swin" if official else "timm-swin"
