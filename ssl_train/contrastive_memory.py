"""SimCLRv2's memory: MoCo's momentum network whose projections are kept as negatives.

SimCLRv2 adds to SimCLR "the memory mechanism from MoCo, which designates a memory
network (with a moving average of weights for stabilization) whose output will be
buffered as negative examples" (paper, section 2; a 64K buffer and a moving-average
decay of 0.999, MoCo's defaults: queue 65,536, momentum 0.999).

Here the memory network is a copy of the backbone and projection head whose parameters
and batch-norm statistics follow the online network's as a moving average, updated after
each optimizer step (``update``); it never gets gradients. It normalises with the
statistics of the batch it projects, as the online network does in training and as
MoCo's key encoder does, never with its running statistics: those are what a network
evaluates with, and at the start they are nothing yet (mean 0, variance 1), so every image
came out nearly the same projection (mean cosine 0.999 on a random batch, against 0.002
with batch statistics). A memory full of one direction pulls every anchor away from it,
towards the same point: with inference-mode statistics the demo's pretraining collapsed
(contrastive accuracy at chance, 28% after finetuning on 1% of the labels against 74%
without memory). Under several ranks its batch norms are global like the online
network's (the loop converts both), so the projections are the same whatever the number
of ranks; its own forward pass leaves the averaged statistics alone
(``track_running_stats`` off). After the update it projects the step's global batch
(``push``): every rank projects its share, one all-gather (no gradient) puts them in
canonical order (view 1 of samples 0..N-1, then view 2), and they replace the oldest
entries of a ring buffer that is the same on every rank. The entries filled so far join
the NT-Xent denominator of both views as extra negatives (``ssl_train.losses.nt_xent``).

Each rank updates the average itself from identical weights, so the memory adds no
all-reduce of parameters; per step it costs one forward pass without backward (with
global batch norm's all-reduce of statistics per layer, forward only) and one all-gather
of (2N x 128) projections. Checkpoints hold it (``state_dict``): network, statistics,
buffer, fill and write position.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ssl_train.dist import gather_rows, world_size
from ssl_train.losses import batch_shares
from ssl_train.shares import Shares


class ContrastiveMemory(nn.Module):
    """The momentum copy of ``model`` (backbone and head) and ``size`` buffered projections.

    Example:
        >>> from ssl_train.models import build_model
        >>> model = build_model("tiny", None, 3, 8)
        >>> memory = ContrastiveMemory(model, size=6, momentum=0.9, dim=8)
        >>> memory.push(torch.rand(4, 3, 16, 16))  # 2 samples x 2 views
        >>> memory.negatives().shape
        torch.Size([4, 8])
    """

    def __init__(self, model: nn.Module, size: int, momentum: float, dim: int) -> None:
        super().__init__()
        if size < 1 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"memory size {size} must be >= 1 and momentum {momentum} in [0, 1)")
        self.momentum = momentum
        self.network = copy.deepcopy(model).train().requires_grad_(False)
        for module in self.network.modules():
            if isinstance(module, _BatchNorm):  # batch statistics; the averaged ones kept
                module.track_running_stats = False
        # on the network's device and in its dtype (float32, or float64 in exactness
        # tests): projections are compared with these entries at every step
        like = next(model.parameters())
        self.register_buffer("buffer", torch.zeros(size, dim, dtype=like.dtype, device=like.device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long, device=like.device))
        self.register_buffer("position", torch.zeros((), dtype=torch.long, device=like.device))
        # the same two counters on the host: reading a device tensor for a slice bound
        # would wait for the GPU at every step; the buffers are what checkpoints hold
        self._filled = self._position = 0
        self.register_load_state_dict_post_hook(_read_counters)

    def train(self, mode: bool = True) -> ContrastiveMemory:
        """Always batch statistics, whatever mode its owner is put in (see the module)."""
        super().train(mode)
        self.network.train()
        return self

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """memory = momentum * memory + (1 - momentum) * online, parameters and BN
        statistics alike (integer counters are copied)."""
        ours, theirs = self.network.state_dict(), online.state_dict()
        if list(ours) != list(theirs):
            raise ValueError("the memory network and the online network differ in structure")
        averaged = [name for name, mine in ours.items() if mine.is_floating_point()]
        # lerp(m, o, 1 - momentum) = momentum * m + (1 - momentum) * o, as multi-tensor
        # kernels: a few launches per step instead of two per tensor (R50: ~320 tensors)
        for names in _same_dtype_and_device(ours, averaged):
            torch._foreach_lerp_(
                [ours[n] for n in names],
                [theirs[n].detach().to(ours[n].dtype) for n in names],
                1.0 - self.momentum,
            )
        for name, mine in ours.items():
            if not mine.is_floating_point():
                mine.copy_(theirs[name])

    @torch.no_grad()
    def push(self, images: Tensor, shares: Shares | None = None) -> None:
        """Project this rank's ``images`` ([view 1; view 2] of its samples) and put the
        global batch's projections into the buffer in canonical order (``shares``: how
        the batch lies over the ranks, as for ``nt_xent``)."""
        projection = self.network(images).projection.to(self.buffer.dtype)  # bf16 -> fp32
        local = F.normalize(projection, dim=1, eps=1e-6)  # as nt_xent normalizes
        view1, view2 = local.chunk(2)
        if world_size() > 1:
            sizes = batch_shares(view1.shape[0], shares).sizes
            gathered = gather_rows(local, [2 * size for size in sizes]).split(
                [2 * size for size in sizes]
            )
            halves = [part.chunk(2) for part in gathered]  # rank order = sample order
            view1 = torch.cat([first for first, _ in halves])
            view2 = torch.cat([second for _, second in halves])
        self._write(torch.cat([view1, view2]))

    def _write(self, entries: Tensor) -> None:
        size = self.buffer.shape[0]
        entries = entries[-size:]  # a batch larger than the buffer keeps its newest entries
        start = self._position
        end = start + entries.shape[0]
        if end <= size:
            self.buffer[start:end] = entries
        else:
            first = size - start
            self.buffer[start:] = entries[:first]
            self.buffer[: end - size] = entries[first:]
        self._position = end % size
        self._filled = min(size, self._filled + entries.shape[0])
        self.position.fill_(self._position)  # host values: no wait for the device
        self.filled.fill_(self._filled)

    def negatives(self) -> Tensor:
        """The entries filled so far (their order does not matter to the loss)."""
        return self.buffer[: self._filled]

    def extra_repr(self) -> str:
        return f"size={self.buffer.shape[0]}, momentum={self.momentum}"


def _read_counters(memory: nn.Module, _incompatible: object) -> None:
    """After a checkpoint is loaded: the host copies of the counters follow the buffers
    (one read per resume, not per step)."""
    memory._filled = int(memory.filled)
    memory._position = int(memory.position)


def _same_dtype_and_device(tensors: dict[str, Tensor], names: list[str]) -> list[list[str]]:
    """``names`` grouped so that each group's tensors share dtype and device, as the
    multi-tensor kernels require."""
    groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for name in names:
        groups.setdefault((tensors[name].dtype, tensors[name].device), []).append(name)
    return list(groups.values())
