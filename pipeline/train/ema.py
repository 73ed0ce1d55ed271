"""Exponential moving average of the trainable weights, kept in fp32 on the training device.

Every rank holds the full average: under ZeRO stages 0-2 every rank has the full weights after a step;
under ZeRO-3 the engine gathers each chunk of parameters for the update (``gather``), so the average is
of the real weights, never of a rank's partition. Frozen parameters and buffers never change, so only the
trainable parameters are averaged; :meth:`EMA.state_dict` fills in the rest from the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from pipeline.train.engine import parameter_chunks

Gather = Callable[[Sequence[nn.Parameter]], AbstractContextManager]
"""A context manager under which the given parameters hold their full values (ZeRO-3's gather)."""


def _no_gather(_: Sequence[nn.Parameter]) -> AbstractContextManager:
    return nullcontext()


class EMA:
    """``ema = decay * ema + (1 - decay) * weights`` over the trainable parameters of ``model``.

    Args:
        model: the detector (parameter names are the model's own, e.g. ``class_head.weight``).
        decay: the averaging decay.
        gather: context manager making parameters whole (identity unless ZeRO-3).
    """

    def __init__(self, model: nn.Module, decay: float, gather: Gather = _no_gather) -> None:
        self.decay = decay
        self.gather = gather
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.shadow: dict[str, torch.Tensor] = {}
        for chunk in parameter_chunks(self._named):
            with self.gather([p for _, p in chunk]):
                for name, parameter in chunk:
                    self.shadow[name] = parameter.detach().to(torch.float32, copy=True)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in (after each optimizer step). All ranks call it together."""
        for chunk in parameter_chunks(self._named):
            with self.gather([p for _, p in chunk]):
                names = [n for n, _ in chunk]
                shadows = [self.shadow[n] for n in names]
                current = [p.detach().to(torch.float32) for _, p in chunk]
                torch._foreach_lerp_(shadows, current, 1.0 - self.decay)

    def state_dict(self, full_model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's full state with the averaged parameters in place of the trainable ones.

        ``full_model_state``: the model's full fp32 state (frozen parameters and buffers are taken from it).
        """
        missing = sorted(set(self.shadow) - set(full_model_state))
        if missing:
            raise ValueError(f"the model state lacks the averaged parameters {missing[:5]}")
        return {k: self.shadow.get(k, v) for k, v in full_model_state.items()}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the average from a state dict holding at least every averaged parameter.

        Raises:
            ValueError: naming missing keys or shape mismatches.
        """
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"the EMA weights lack {len(missing)} parameters, e.g. {missing[:5]}")
        wrong = [k for k in self.shadow if tuple(state[k].shape) != tuple(self.shadow[k].shape)]
        if wrong:
            raise ValueError(f"the EMA weights have other shapes for {wrong[:5]}")
        for name, value in self.shadow.items():
            value.copy_(state[name].to(value.device, torch.float32))
