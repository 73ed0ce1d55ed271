"""Conversion of the official DINO release's state dicts (IDEA-Research/DINO ``model`` dicts) to ours.

The official layout keeps the transformer under ``transformer.``, stores the shared decoder heads once per
layer (and again under ``transformer.decoder.``), the input projections as ``input_proj.{l}.{0,1}``
(conv, GroupNorm) and the backbone under ``backbone.0.`` (``body.`` for ResNet). Loading checks every
key and shape, so a checkpoint of another preset fails with the list of what does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

_PREFIXES = (
    ("transformer.level_embed", "level_embed"),
    ("transformer.encoder.", "encoder."),
    ("transformer.decoder.layers.", "decoder.layers."),
    ("transformer.decoder.norm.", "decoder.norm."),
    ("transformer.decoder.ref_point_head.", "decoder.ref_point_head."),
    ("transformer.tgt_embed.", "query_selection.tgt_embed."),
    ("transformer.refpoint_embed.", "query_selection.refpoint_embed."),
    ("transformer.enc_output_norm.", "query_selection.enc_output_norm."),
    ("transformer.enc_output.", "query_selection.enc_output."),
    ("transformer.enc_out_bbox_embed.", "query_selection.enc_box_head."),
    ("transformer.enc_out_class_embed.", "query_selection.enc_class_head."),
    ("label_enc.", "label_enc."),
)


def is_official_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict looks like the official release's (has its transformer/backbone prefixes)."""
    return any(k.startswith("transformer.") for k in state_dict) and any(
        k.startswith("backbone.0.") for k in state_dict
    )


def _shared_head(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # The official model repeats one shared head per decoder layer; all copies must be the same tensor.
    copies: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for root in (prefix, f"transformer.decoder.{prefix}"):
            if key.startswith(root):
                layer, _, rest = key[len(root) :].partition(".")
                copies.setdefault(layer, {})[rest] = value
    if not copies:
        return {}
    first = copies[min(copies, key=int)]
    for layer, params in copies.items():
        if params.keys() != first.keys() or any(not torch.equal(params[k], first[k]) for k in first):
            raise ValueError(
                f"the official checkpoint has per-layer '{prefix}' heads (layer {layer} differs from "
                "layer 0); "
                "only the shared heads of the released models are supported"
            )
    return first


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor], backbone_is_swin: bool
) -> dict[str, torch.Tensor]:
    """Map an official DINO ``model`` state dict to this package's parameter names.

    Args:
        state_dict: the ``model`` entry of an official ``.pth`` (``module.`` prefixes are stripped).
        backbone_is_swin: whether the target model's backbone is Swin (decides the backbone key layout).

    Returns:
        A state dict for :class:`dino_core.detector.DINO` (unknown keys are passed through unchanged so the
        loader can report them).
    """
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    state = {
        k: v
        for k, v in state.items()
        if not k.endswith(("relative_position_index", "attn_mask", "num_batches_tracked"))
    }
    converted: dict[str, torch.Tensor] = {}
    converted.update({f"class_head.{k}": v for k, v in _shared_head(state, "class_embed.").items()})
    converted.update({f"box_head.{k}": v for k, v in _shared_head(state, "bbox_embed.").items()})
    for key, value in state.items():
        if key.startswith(
            (
                "class_embed.",
                "bbox_embed.",
                "transformer.decoder.class_embed.",
                "transformer.decoder.bbox_embed.",
            )
        ):
            continue
        new = None
        for old_prefix, new_prefix in _PREFIXES:
            if key.startswith(old_prefix):
                new = new_prefix + key[len(old_prefix) :]
                break
        if new is None and key.startswith("input_proj."):
            _, level, part, rest = key.split(".", 3)
            new = f"neck.projections.{level}.{'conv' if part == '0' else 'norm'}.{rest}"
        if new is None and key.startswith("backbone.0."):
            rest = key[len("backbone.0.") :]
            new = _swin_key(rest) if backbone_is_swin else f"backbone.{rest}"
        converted[new if new is not None else key] = value
    return converted


def _swin_key(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "layers":
        stage = int(parts[1]) + (1 if parts[2] == "downsample" else 0)
        return ".".join([f"backbone.body.layers_{stage}", *parts[2:]])
    if parts[0] == "patch_embed":
        return f"backbone.body.{key}"
    if parts[0].startswith("norm") and parts[0][4:].isdigit():
        return f"backbone.out_norms.{parts[0][4:]}.{'.'.join(parts[1:])}"
    return f"backbone.{key}"


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load an official checkpoint into ``model`` after checking every key and shape.

    Raises:
        ValueError: naming ``source``, the missing and unexpected keys and the shape mismatches, when the
            checkpoint was made for another preset (other backbone, levels, classes or query count).
    """
    is_swin = bool(getattr(getattr(model, "backbone", None), "is_swin", False))
    converted = convert_official_state_dict(state_dict, backbone_is_swin=is_swin)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in converted)
    unexpected = sorted(k for k in converted if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in converted.items()
        if k in own and v.shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source} does not fit this model preset: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}, {len(mismatched)} shape mismatches "
            f"{mismatched[:8]}; pick the model preset the checkpoint was trained with (e.g. "
            "model=dino_r50_4scale for checkpoint0011_4scale.pth, model=dino_swinl_4scale for the Swin-L "
            "release)"
        )
    model.load_state_dict(converted, strict=True)
