"""LARS and the SimCLR learning-rate schedule, ported from the official code.

LARS follows google-research/simclr ``tf2/lars_optimizer.py`` with classic momentum:
weight decay is added to the gradient, the trust ratio ``eeta * ||w|| / ||g||`` scales
the learning rate per tensor, and BN parameters and biases get neither weight decay nor
trust scaling. The step runs as multi-tensor (``torch._foreach_*``) ops per group, device
and dtype (on the CPU in chunks of about 4 MiB), with the trust ratios kept on the device
(no host sync). The schedule is ``WarmUpAndCosineDecay`` from ``tf2/model.py``: linear
warmup from 0, then cosine decay to exactly 0, indexed by global step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
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
        """One LARS update of every parameter that has a gradient.

        Runs as multi-tensor (``torch._foreach_*``) ops over the parameters of a group,
        split by device and dtype as torch's own optimizers do (and on the CPU into
        chunks of about 4 MiB, see ``_CPU_CHUNK_BYTES``), instead of a handful of
        kernels per tensor (R50 with its head has 167 parameter tensors). The trust
        ratios stay on the device (``torch.where`` over the stacked norms), so nothing
        waits for the GPU.

        Example:
            >>> net = nn.Linear(3, 2)
            >>> opt = LARS(lars_param_groups(net, weight_decay=1e-6), lr=0.3)
            >>> net(torch.ones(1, 3)).sum().backward(); opt.step()
            >>> sorted(opt.state[net.weight])
            ['momentum_buffer']
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(param)
                params.append(param)
                grads.append(param.grad)
                buffers.append(state["momentum_buffer"])
            if not params:
                continue
            grouped = self._group_tensors_by_device_and_dtype([params, grads, buffers])
            for tensors, _ in grouped.values():
                for chunk in _chunks(*tensors):  # type: ignore[arg-type]  # no None here
                    _lars_foreach(
                        *chunk,
                        lr=group["lr"],
                        momentum=group["momentum"],
                        weight_decay=group["weight_decay"],
                        eeta=group["eeta"],
                        nesterov=group["nesterov"],
                        trust=not group["lars_exclude"],
                    )
        return loss


# On the CPU a foreach op is a C++ loop over its tensors: run over a whole group, each op
# streams all of it through memory (R50: 129 MB per list) and every temporary is alive
# at once, which made the step cost more CPU time than the per-tensor loop it replaced.
# In chunks of about this many bytes a chunk's data can stay in cache from op to op and
# the temporaries stay small (bench/lars_step.py, BENCHMARKS.md). Other devices get one
# chunk: a foreach kernel there already splits its work, and fewer launches is the point.
_CPU_CHUNK_BYTES = 4 * 2**20


def _chunks(
    params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor]
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]]:
    """Split same-device lists into runs of about ``_CPU_CHUNK_BYTES`` of parameters on
    the CPU (a larger tensor ends its run), or yield them whole on any other device.

    Example:
        >>> ps = [torch.zeros(2**20), torch.zeros(8), torch.zeros(2**19), torch.zeros(8)]
        >>> [len(c[0]) for c in _chunks(ps, ps, ps)]  # 4 MiB, then the rest
        [1, 3]
    """
    if params[0].device.type != "cpu":
        yield params, grads, buffers
        return
    start, size = 0, 0
    for i, param in enumerate(params):
        size += param.numel() * param.element_size()
        if size >= _CPU_CHUNK_BYTES or i == len(params) - 1:
            yield params[start : i + 1], grads[start : i + 1], buffers[start : i + 1]
            start, size = i + 1, 0


def _lars_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    buffers: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eeta: float,
    nesterov: bool,
    trust: bool,
) -> None:
    """The LARS update of tensors on one device with one dtype, in place.

    The ops and their order are those of the per-tensor formula in :class:`LARS` (decay
    added to a copy of the gradient, ``eeta * ||w||`` then ``/ ||g||``, ``lr * trust``,
    ``g * scaled_lr``, ``v * momentum`` then ``+ step``), so on CPU the result is bitwise
    that of a loop over the tensors. On CUDA each op is one multi-tensor kernel (or one
    kernel on the stacked norms) except the multiplication by each tensor's own trust
    ratio: foreach's fast path needs tensors of equal shapes, so a list of 0-d ratios
    takes its per-tensor path (one kernel per LARS-scaled tensor, still no sync).

    Example:
        >>> w, g, v = [torch.tensor([3.0, 4.0])], [torch.tensor([0.6, 0.8])], [torch.zeros(2)]
        >>> _lars_foreach(w, g, v, lr=1.0, momentum=0.9, weight_decay=0.0, eeta=0.001,
        ...               nesterov=False, trust=True)
        >>> w[0]  # trust = 0.001 * 5 / 1: w - 0.005 g
        tensor([2.9970, 3.9960])
    """
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)  # the caller's grads stay
    if trust:
        w_norms = torch.stack(torch._foreach_norm(params))
        g_norms = torch.stack(torch._foreach_norm(grads))
        # tensors, not Python floats: no host sync; 1 where either norm is 0 (not 0/0)
        ratios = torch.where(
            (w_norms > 0) & (g_norms > 0), eeta * w_norms / g_norms, torch.ones_like(w_norms)
        )
        scaled_lrs = list((lr * ratios).unbind())
        if weight_decay:  # the decayed gradients are a copy already: scale them in place
            torch._foreach_mul_(grads, scaled_lrs)  # (one group-sized temporary, not two)
            steps = grads
        else:
            steps = torch._foreach_mul(grads, scaled_lrs)
    else:
        steps = torch._foreach_mul(grads, lr)
    # momentum as a 0-d float64 tensor, not a float: on CPU the in-place foreach op rounds
    # a Python scalar to a bf16/fp16 tensor's dtype first (0.9 -> 0.8984), which
    # ``buffer.mul_(0.9)`` does not; CUDA reads a CPU 0-d tensor as that same scalar.
    torch._foreach_mul_(buffers, torch.tensor(momentum, dtype=torch.float64))
    torch._foreach_add_(buffers, steps)
    if nesterov:
        updates = torch._foreach_mul(buffers, momentum)
        torch._foreach_add_(updates, steps)
        torch._foreach_sub_(params, updates)
    else:
        torch._foreach_sub_(params, buffers)


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
