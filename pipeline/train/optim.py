"""AdamW parameter groups as ordered rules, and the step schedule of the learning rate.

Groups (first matching rule wins; parameters without a gradient are left out and counted as frozen):

1. ``backbone``: names starting with ``backbone.`` -> ``train.lr_backbone`` (1e-5).
2. ``linear_proj``: the deformable attention's sampling-offset projections (``*.sampling_offsets.*`` in
   the encoder's self-attention and the decoder's cross-attention) -> ``lr * lr_linear_proj_mult`` (the
   official ``lr_linear_proj_names = ['reference_points', 'sampling_offsets']``; DINO has no
   ``reference_points`` projection, its anchors are refined by the box head).
3. ``default``: everything else -> ``train.lr`` (1e-4).

With ``train.decay_norm_and_bias=false`` each group is split into ``<group>`` and ``<group>/no_decay``
(1-D parameters: norms and biases, and the level embedding) with weight decay 0.

The schedule is a pure function of the optimizer step: ``lr(step) = base * warmup(step) * drop(step)``,
so resuming needs no scheduler state: the step alone restores it exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from pipeline.train.config import TrainConfig


@dataclass(frozen=True)
class GroupRule:
    """One rule: parameters whose name satisfies ``matches`` train at ``lr``."""

    name: str
    matches: Callable[[str], bool]
    lr: float


@dataclass
class ParamGroup:
    """A resolved group: its parameters (in model order) and optimizer settings."""

    name: str
    lr: float
    weight_decay: float
    names: list[str]
    params: list[nn.Parameter]

    @property
    def numel(self) -> int:
        """Elements of all its parameters."""
        return sum(p.numel() for p in self.params)

    def as_torch(self) -> dict:
        """The ``torch.optim`` parameter-group dict (the name is kept for logging)."""
        return {"params": self.params, "lr": self.lr, "weight_decay": self.weight_decay, "name": self.name}


def _is_linear_proj(name: str) -> bool:
    return ".sampling_offsets." in name or ".reference_points." in name


def group_rules(train: TrainConfig) -> list[GroupRule]:
    """The ordered rules of the recipe (see the module docstring)."""
    return [
        GroupRule("backbone", lambda n: n.startswith("backbone."), train.lr_backbone),
        GroupRule("linear_proj", _is_linear_proj, train.lr * train.lr_linear_proj_mult),
        GroupRule("default", lambda n: True, train.lr),
    ]


def _no_decay(name: str, parameter: nn.Parameter) -> bool:
    return parameter.dim() <= 1 or name.endswith(".bias")


def parameter_groups(
    model: nn.Module, rules: Sequence[GroupRule], weight_decay: float, decay_norm_and_bias: bool = True
) -> tuple[list[ParamGroup], int]:
    """Assign every trainable parameter of ``model`` to the first rule it matches.

    Returns:
        The non-empty groups in rule order, and the number of frozen parameter elements (not optimised).

    Raises:
        ValueError: when a trainable parameter matches no rule (the last rule should match everything).
    """
    groups: dict[str, ParamGroup] = {}
    frozen = 0
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            frozen += parameter.numel()
            continue
        rule = next((r for r in rules if r.matches(name)), None)
        if rule is None:
            raise ValueError(f"parameter {name} matches no parameter-group rule ({[r.name for r in rules]})")
        key, decay = rule.name, weight_decay
        if not decay_norm_and_bias and _no_decay(name, parameter):
            key, decay = f"{rule.name}/no_decay", 0.0
        group = groups.setdefault(key, ParamGroup(key, rule.lr, decay, [], []))
        group.names.append(name)
        group.params.append(parameter)
    order = {rule.name: i for i, rule in enumerate(rules)}
    ordered = sorted(groups.values(), key=lambda g: (order[g.name.split("/")[0]], g.name))
    return ordered, frozen


def describe_groups(groups: Sequence[ParamGroup], frozen: int) -> list[str]:
    """One log line per group: name, lr, weight decay, tensors and parameter count; then the frozen count."""
    lines = [
        f"param group {g.name:<22} lr {g.lr:.3g}  weight_decay {g.weight_decay:.3g}  "
        f"{len(g.params):4d} tensors  {g.numel:,} parameters"
        for g in groups
    ]
    lines.append(f"param group {'(frozen)':<22} {frozen:,} parameters without gradient")
    return lines


@dataclass(frozen=True)
class StepSchedule:
    """The learning-rate factor of each optimizer step (multiplies every group's base lr).

    ``drop_steps``: the optimizer steps at which each drop epoch starts; ``warmup_steps``: linear warm-up.
    """

    drop_steps: tuple[int, ...]
    drop_factor: float
    warmup_steps: int

    def factor(self, step: int) -> float:
        """The factor for optimizer step ``step`` (0-based: the step about to be taken)."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        drops = sum(1 for s in self.drop_steps if step >= s)
        return warm * self.drop_factor**drops


def step_schedule(train: TrainConfig, micro_batches_per_epoch: int) -> StepSchedule:
    """The schedule of ``train`` for epochs of ``micro_batches_per_epoch`` batches per rank.

    A drop at epoch ``e`` takes effect from the optimizer step that consumes the epoch's first batch:
    ``e * micro_batches_per_epoch // grad_accumulation`` (step ``s`` consumes micro-batches ``s * GA`` to
    ``s * GA + GA - 1``).
    """
    drops = tuple(e * micro_batches_per_epoch // train.grad_accumulation for e in train.lr_drop_epochs)
    return StepSchedule(drops, train.lr_drop_factor, train.warmup_steps)


def total_steps(train: TrainConfig, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of the whole stage: the epochs' micro-batches over ``grad_accumulation``, capped by
    ``max_steps`` (steps skipped for a non-finite loss are not counted, so the data can run out first)."""
    steps = train.epochs * micro_batches_per_epoch // train.grad_accumulation
    return min(steps, train.max_steps) if train.max_steps > 0 else steps
