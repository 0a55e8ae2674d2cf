"""Run ssl-train's CUDA code paths on a machine without a GPU.

torch's FakeTensorMode gives tensors whose device is ``cuda`` and computes only their
metadata (shape, dtype, device, layout): every operator checks its inputs' devices as
on a GPU and raises ``FakeTensorDeviceMismatchError`` on a CUDA/CPU mix, and reading a
value back to the host (``.item()``, ``int()``, a Python branch on a tensor, what would
wait for the GPU) raises ``DataDependentOutputException``. Four things need help here:

- ``torch.autocast("cuda")`` switches itself off when no driver is found: told that
  CUDA and bf16 are available, it dispatches the fake tensors through CUDA's autocast
  rules, as on a GPU;
- ``loss.backward()`` goes through the autograd engine, which sets up CUDA streams for
  CUDA tensors and needs a real driver for that (pytorch/pytorch#92627). The graph is
  walked here in Python instead, calling each node's backward as the engine would
  (``backward_in_python``): the same kernels, with their device checks;
- ``nn.init.trunc_normal_`` draws until every value is in range, a loop on a tensor's
  value; initial values do not matter to metadata, so it becomes a clamped normal;
- ``copy.deepcopy`` of fake parameters (SimCLRv2's memory network) must stay in the
  same fake mode: torch's ``FakeCopyMode`` does that.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

CUDA = torch.device("cuda", 0)


def _clamped_normal(
    tensor: torch.Tensor,
    mean: float = 0.0,
    std: float = 1.0,
    a: float = -2.0,
    b: float = 2.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    with torch.no_grad():
        return tensor.normal_(mean, std).clamp_(a, b)


def backward_in_python(loss: torch.Tensor) -> None:
    """``loss.backward()`` without the autograd engine: each node of the graph runs once
    all the nodes that feed it gradients have run (dependency counts, as the engine
    does), each gradient checked and shaped as the engine's ``validate_outputs`` does,
    and ``AccumulateGrad`` nodes add into the leaves' ``.grad``."""
    root = loss.grad_fn
    if root is None:
        raise RuntimeError("the loss has no graph: nothing requires a gradient")
    pending: Counter = Counter()
    seen, stack = {root}, [root]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is not None:
                pending[child] += 1
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
    gradients: dict = {root: {0: torch.ones_like(loss)}}
    ready = [root]
    while ready:
        node = ready.pop()
        given = gradients.pop(node, {})
        outputs = node(*[given.get(i) for i in range(len(node._input_metadata))])
        if not isinstance(outputs, tuple):
            outputs = (outputs,)
        for (child, slot), gradient in zip(node.next_functions, outputs, strict=False):
            if child is None:
                continue
            if gradient is not None:
                gradient = _as_the_engine_hands_it(gradient, child._input_metadata[slot])
                inputs = gradients.setdefault(child, {})
                inputs[slot] = gradient if slot not in inputs else inputs[slot] + gradient
            pending[child] -= 1
            if pending[child] == 0:
                ready.append(child)


def _as_the_engine_hands_it(gradient: torch.Tensor, expected: object) -> torch.Tensor:
    """What the engine's ``validate_outputs`` does between two nodes: a gradient of a
    broadcast input is summed back to its shape and cast to its dtype; one on another
    device is an error."""
    if gradient.device != expected.device:
        raise RuntimeError(
            f"invalid gradient: expected device {expected.device} but got {gradient.device}"
        )
    if tuple(gradient.shape) != tuple(expected.shape):
        gradient = gradient.sum_to_size(expected.shape)
    if gradient.dtype != expected.dtype:
        gradient = gradient.to(expected.dtype)
    return gradient


@contextlib.contextmanager
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTensorMode]:
    """A FakeTensorMode in which ``cuda`` tensors, autocast on ``cuda`` and
    ``Tensor.backward`` work without a GPU (see the module docstring).

    Example (in a test taking ``monkeypatch``):
        with fake_cuda(monkeypatch):
            x = torch.ones(2, device="cuda")
            x + torch.ones(2)  # raises FakeTensorDeviceMismatchError
    """
    import torch.cuda.amp.common as amp_common

    monkeypatch.setattr(amp_common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.nn.init, "trunc_normal_", _clamped_normal)
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: backward_in_python(self))
    # real tensors made before the mode (a loaded checkpoint) become fake ones of their
    # own device; mixing them with CUDA ones still raises
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, FakeCopyMode(mode):
        yield mode
