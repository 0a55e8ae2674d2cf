"""LARS and the SimCLR learning-rate schedule, ported from the official code.

LARS follows google-research/simclr ``tf2/lars_optimizer.py`` with classic momentum:
weight decay is added to the gradient, the trust ratio ``eeta * ||w|| / ||g||`` scales
the learning rate per tensor, and BN parameters and biases get neither weight decay nor
trust scaling. The schedule is ``WarmUpAndCosineDecay`` from ``tf2/model.py``: linear
warmup from 0, then cosine decay to exactly 0, indexed by global step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

EETA = 0.001
MOMENTUM = 0.9
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def lars_param_groups(
    model: nn.Module,
    weight_decay: float,
    exclude: Callable[[str, nn.Parameter], bool] | None = None,
) -> list[dict[str, Any]]:
    """Split parameters into the LARS-scaled, weight-decayed group and the excluded one.

    Excluded (no weight decay, no trust ratio): every parameter of a normalisation layer,
    every bias and any other 1-D parameter, detected by module type and shape rather than
    by name; plus whatever ``exclude(name, param)`` selects (the official code also
    excludes its supervised head).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> [len(g["params"]) for g in lars_param_groups(net, weight_decay=1e-4)]
        [1, 3]
    """
    norm_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, _NORM_TYPES)
        for p in m.parameters(recurse=False)
    }
    scaled, excluded = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = (
            id(param) in norm_params
            or param.ndim <= 1
            or (exclude is not None and exclude(name, param))
        )
        (excluded if skip else scaled).append(param)
    return [
        {"params": scaled, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with classic momentum, as SimCLR trains.

    Per tensor: ``g += wd * w``; ``trust = eeta * ||w|| / ||g||`` (1 when either norm is
    0 or the group is excluded); ``v = momentum * v + lr * trust * g``; ``w -= v``
    (Nesterov: ``w -= momentum * v + lr * trust * g``). Groups from
    :func:`lars_param_groups` carry ``lars_exclude``.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> opt = LARS(lars_param_groups(net, weight_decay=1e-6), lr=0.3)
        >>> net(torch.ones(1, 3)).sum().backward(); opt.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = MOMENTUM,
        weight_decay: float = 0.0,
        eeta: float = EETA,
        nesterov: bool = False,
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eeta <= 0:
            raise ValueError(
                "LARS needs lr >= 0, 0 <= momentum < 1, weight_decay >= 0 and eeta > 0"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eeta": eeta,
            "nesterov": nesterov,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, eeta = group["lr"], group["momentum"], group["eeta"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                if group["lars_exclude"]:
                    scaled_lr: torch.Tensor | float = lr
                else:
                    w_norm = torch.linalg.vector_norm(param)
                    g_norm = torch.linalg.vector_norm(grad)
                    # tensors, not Python floats: no host sync per parameter on CUDA
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), eeta * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    scaled_lr = lr * trust
                state = self.state[param]
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = torch.zeros_like(param)
                step = grad * scaled_lr
                buffer.mul_(momentum).add_(step)
                param.sub_(buffer * momentum + step if group["nesterov"] else buffer)
        return loss


def scale_learning_rate(base_lr: float, global_batch_size: int, scaling: str) -> float:
    """The paper's learning-rate scaling: ``linear`` = lr*B/256, ``sqrt`` = lr*sqrt(B).

    Example:
        >>> scale_learning_rate(0.075, 4096, "sqrt")
        4.8
    """
    if scaling == "linear":
        return base_lr * global_batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch_size)
    raise ValueError(f"learning-rate scaling {scaling!r} unknown; use 'linear' or 'sqrt'")


def warmup_steps_for(warmup_epochs: float, num_examples: int, global_batch_size: int) -> int:
    """Warmup length in steps, rounded as the official code does.

    Example:
        >>> warmup_steps_for(10, 1_281_167, 4096)
        3127
    """
    return round(warmup_epochs * num_examples // global_batch_size)  # round() of a float is an int


def total_steps_for(
    epochs: float, num_examples: int, global_batch_size: int, max_steps: int | None = None
) -> int:
    """Training length in steps: ``max_steps`` if given, else the official formula.

    Example:
        >>> total_steps_for(800, 1_281_167, 4096)
        250228
    """
    return max_steps or int(num_examples * epochs // global_batch_size) + 1


def warmup_cosine_lr(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 to ``peak_lr``, then cosine decay to 0 at ``total_steps``.

    Example:
        >>> [round(warmup_cosine_lr(s, 1.0, 10, 110), 3) for s in (0, 5, 10, 60, 110, 200)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps})")
    if step < 0:
        raise ValueError(f"step {step} is negative")
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = min(step - warmup_steps, decay_steps) / decay_steps
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Sets every group's learning rate from the global step; its state is the step.

    Example:
        >>> opt = LARS(nn.Linear(2, 2).parameters(), lr=0.0)
        >>> schedule = WarmupCosineSchedule(opt, peak_lr=1.0, warmup_steps=10, total_steps=110)
        >>> schedule.step_to(5)
        0.5
        >>> opt.param_groups[0]["lr"]
        0.5
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, peak_lr: float, warmup_steps: int, total_steps: int
    ):
        warmup_cosine_lr(0, peak_lr, warmup_steps, total_steps)  # validates the arguments
        self.optimizer, self.peak_lr = optimizer, peak_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.step_number = 0
        self.step_to(0)

    def step_to(self, step: int) -> float:
        self.step_number = step
        lr = warmup_cosine_lr(step, self.peak_lr, self.warmup_steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step_number}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_to(int(state["step"]))
