"""Collectives that keep W ranks x B samples equal to one process on W*B samples.

Two places in SimCLRv2 couple the samples of a global batch: the contrastive loss (every
anchor's negatives are the whole global batch) and batch norm (statistics over the
whole global batch, so that a rank cannot cheat the loss with its local statistics).
Both need collectives whose backward passes route gradients to the rank that owns
each sample. torch's own answers fall short here: ``all_gather`` has no gradient, and
``SyncBatchNorm`` refuses CPU tensors (so it cannot run under gloo in tests) and
spends an ``all_gather`` per forward. Global batch norm here needs one ``all_reduce``
forward and one backward; the gather is one ``all_gather_single`` forward and one
``all_reduce`` backward. gloo and NCCL implement both, so the same code runs in CPU
tests and on GPUs.

Without an initialised process group (or with one rank) everything here is the plain
single-process computation, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "GlobalBatchNorm",
    "convert_to_global_bn",
    "gather_rows",
    "gather_with_grad",
    "rank",
    "world_size",
]

ProcessGroup = Any  # torch.distributed.ProcessGroup; Any keeps `None` (= default group) simple


def world_size(group: ProcessGroup | None = None) -> int:
    """Number of ranks, 1 when torch.distributed is not initialised (single process).

    Example:
        >>> world_size()  # a plain Python process
        1
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group``, 0 when torch.distributed is not initialised.

    Example:
        >>> rank()
        0
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


# --- all-gather with gradient --------------------------------------------------------------


def _all_gather_rows(x: Tensor, sizes: Sequence[int], group: ProcessGroup | None) -> Tensor:
    """Every rank's rows of ``x`` (rank r holds ``sizes[r]``), in rank order. Equal
    sizes take one plain all-gather; unequal ones are padded to the largest, gathered,
    and the padding dropped (the collective needs one size)."""
    largest = max(sizes)
    x = x.contiguous()
    if x.shape[0] != largest:
        x = torch.cat([x, x.new_zeros((largest - x.shape[0], *x.shape[1:]))])
    out = x.new_empty((len(sizes) * largest, *x.shape[1:]))
    # torch 2.14 renamed all_gather_into_tensor (now a deprecated alias)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    if all(size == largest for size in sizes):
        return out
    return torch.cat([out[r * largest : r * largest + size] for r, size in enumerate(sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather forward; backward sums every rank's gradient and keeps our slice.

    Each rank's loss uses every rank's rows, so the gradient that belongs to our rows is
    the sum over ranks of what their losses send back. gloo has no reduce_scatter, hence
    all_reduce followed by slicing (on NCCL a reduce_scatter would move 1/W of the data;
    the gathered tensors here are small: global batch x 128).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, sizes: tuple[int, ...], group: ProcessGroup | None
    ) -> Tensor:
        ctx.group = group
        ctx.local_rows = x.shape[0]
        ctx.start = sum(sizes[: rank(group)])
        return _all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd owns `grad`
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.local_rows], None, None


def gather_with_grad(
    x: Tensor, sizes: Sequence[int] | None = None, group: ProcessGroup | None = None
) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order), keeping the gradient.

    ``sizes`` are the rows each rank passes (``ssl_train.shares.Shares``: they may differ
    by one); None means every rank passes as many as this one. With DDP averaging
    gradients over W ranks, a loss computed on the gathered tensor and divided by
    ``Shares.mean_divisor`` gives exactly the gradient of one process on the whole global
    batch. Identity for one rank.

    Example:
        >>> x = torch.randn(4, 128, requires_grad=True)
        >>> gather_with_grad(x).shape  # (sum of every rank's rows, 128)
        torch.Size([4, 128])
    """
    world = world_size(group)
    if world == 1:
        return x
    sizes = tuple(sizes) if sizes is not None else (x.shape[0],) * world
    if len(sizes) != world or sizes[rank(group)] != x.shape[0]:
        raise ValueError(
            f"rank {rank(group)} passes {x.shape[0]} rows, but the sizes given are {sizes} "
            f"for {world} ranks"
        )
    return _GatherWithGrad.apply(x, sizes, group)


def gather_rows(x: Tensor, sizes: Sequence[int], group: ProcessGroup | None = None) -> Tensor:
    """Every rank's rows of ``x`` in rank order, without gradient (``sizes`` as for
    ``gather_with_grad``). Identity for one rank.

    Example:
        >>> gather_rows(torch.ones(3, 2), sizes=[3]).shape
        torch.Size([3, 2])
    """
    if world_size(group) == 1:
        return x
    return _all_gather_rows(x, sizes, group)


# --- global batch norm ---------------------------------------------------------------------

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _float(x: Tensor) -> Tensor:
    """Statistics are sums over up to millions of values: never accumulate them in 16 bits."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _local_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-channel mean and biased variance of this rank's ``x`` (float64), and a buffer.

    On CPU, torch's group norm with one channel per group computes per-(sample,
    channel) moments with a stable one-pass kernel, about 3x faster than
    ``batch_norm_update_stats`` (two passes) on contiguous (N, C, H, W); Chan's formula
    then merges the rows in float64. Its normalised output is not needed: it comes back
    as a buffer of x's shape for the caller to overwrite (one large allocation fewer;
    the group-norm ``out=`` variant would only copy). Elsewhere (CUDA, channels_last,
    2-D) ``batch_norm_update_stats`` is the right kernel, and there is no buffer.
    """
    channels = x.shape[1]
    if x.numel() == 0:  # an empty local batch still joins the collective, with nothing in it
        zeros = x.new_zeros(channels, dtype=torch.float64)
        return zeros, zeros, None
    rows = x.shape[0]
    spatial = x.numel() // (rows * channels)
    if x.device.type == "cpu" and spatial > 1 and x.is_contiguous():
        # eps 0: rstd = var^-1/2 exactly (inf for a constant row, which gives var 0)
        buffer, row_mean, row_rstd = torch.native_group_norm(
            x, None, None, rows, channels, spatial, channels, 0.0
        )
        row_mean, row_var = row_mean.double(), row_rstd.double().pow(-2)
        mean = row_mean.mean(0)
        return mean, row_var.mean(0) + (row_mean - mean).pow(2).mean(0), buffer
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    return mean.double(), var.double(), None


def _fused_kernels(x: Tensor) -> bool:
    """Whether ``x`` takes torch's SyncBatchNorm kernels (``batch_norm_stats``,
    ``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``): one pass each, reading
    bf16 input as it is with float32 statistics. They exist for CUDA only."""
    return x.is_cuda


def _fused_local_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's per-channel mean and biased variance (float64) from
    ``batch_norm_stats``: with eps 0 its inverse std is 1/sqrt(var), or 0 for a
    constant channel (its ``InvStd``), which is variance 0 here."""
    mean, invstd = torch.batch_norm_stats(x, 0.0)
    var = torch.where(invstd > 0, invstd.double().pow(-2), 0.0)
    return mean.double(), var


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


class _GlobalBatchNormFn(torch.autograd.Function):
    """Batch norm with global statistics: one all_reduce forward, one backward.

    Forward: each rank computes its per-channel mean and (biased) variance with a stable
    kernel (``_local_moments``), turns them into [sum(x), sum(x^2)] plus its count, and
    one all_reduce of that fused float64 vector gives the global mean and variance
    (float64 so that sum(x^2)/n - mean^2 does not cancel when |mean| >> std; the vector
    is only 2C+1 long). The output is then torch's own eval-mode kernel with those
    statistics. (That kernel computes x * (w * invstd) + (b - mean * w * invstd), so its
    float32 rounding grows with |mean| * invstd: on a channel that is constant over the
    whole global batch, about 1e-7 * |mean| * |w| / sqrt(eps) absolute, where torch's
    training kernel gives 0.)

    Backward: torch's eval-mode batch-norm backward kernel gives the local
    [sum(dy), sum(dy * xhat)] in one pass (they are exactly grad_bias and grad_weight);
    one all_reduce makes them global, and dx = w * invstd * (dy - mean(dy) - xhat *
    mean(dy * xhat)) is one eval-mode batch-norm pass plus one fused multiply-add.
    Stock CPU ops cannot fuse these passes per channel the way torch's own batch norm
    does, which is what its extra time over nn.BatchNorm2d is (see BENCHMARKS.md).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        group: ProcessGroup | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        channels = x.shape[1]
        local_count = x.numel() // channels if channels else 0
        if _fused_kernels(x) and local_count:  # they read bf16 as it is
            (mean, var), buffer = _fused_local_moments(x), None
        else:
            mean, var, buffer = _local_moments(_float(x))
        acc_dtype = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
        sums = torch.cat(
            [
                mean * local_count,
                (var + mean * mean) * local_count,
                mean.new_full((1,), local_count),
            ]
        )
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        count = sums[-1]
        mean = sums[:channels] / count
        var = (sums[channels:-1] / count - mean * mean).clamp_min_(0.0)
        unbiased_var = var * (count / (count - 1).clamp_min(1.0))
        mean, var, unbiased_var = (t.to(acc_dtype) for t in (mean, var, unbiased_var))

        # torch's kernels take float32 statistics with bf16/fp16 input, but a model cast
        # wholly to bf16 has bf16 parameters, and then they want bf16 statistics
        stats_dtype = weight.dtype if weight is not None else acc_dtype
        mean_p, var_p = mean.to(stats_dtype), var.to(stats_dtype)
        if buffer is not None and buffer.dtype == x.dtype:
            y = buffer  # same shape, dtype and layout as x, and ours to overwrite
            torch.ops.aten.native_batch_norm.out(
                x,
                weight,
                bias,
                mean_p,
                var_p,
                False,  # eval mode: normalise with the statistics given
                0.0,
                eps,
                out=y,
                save_mean=mean_p.new_empty(0),
                save_invstd=mean_p.new_empty(0),
            )
        else:
            y = F.batch_norm(x, mean_p, var_p, weight, bias, training=False, eps=eps)

        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        ctx.group = group
        ctx.count = count  # float64
        ctx.local_count = local_count
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, unbiased_var)
        return y, mean, unbiased_var

    @staticmethod
    def backward(
        ctx: FunctionCtx, dy: Tensor, _dmean: Tensor | None, _dvar: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        x, weight, mean, var = ctx.saved_tensors
        if ctx.local_count and _fused_kernels(x):
            return _fused_backward(ctx, dy, x, weight, mean, var)
        xs, dys = _float(x), _float(dy)
        weight_s = None if weight is None else weight.to(xs.dtype)
        if ctx.local_count:
            # eval-mode kernel: grad_weight = sum(dy * xhat), grad_bias = sum(dy), one pass.
            # save_mean/save_invstd empty (not None): "use the running statistics given",
            # which torch's CUDA kernel requires to be a defined tensor
            none = mean.new_empty(0)
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                dys, xs, weight_s, mean, var, none, none, False, ctx.eps, [False, True, True]
            )
        else:  # (torch's kernel divides by zero on an empty batch)
            sum_dy_xhat, sum_dy = torch.zeros_like(mean), torch.zeros_like(mean)
        grad_weight = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] and ctx.has_bias else None

        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            mean_dy, mean_dy_xhat = (sums / ctx.count.to(sums.dtype)).chunk(2)
            scale = torch.rsqrt(var + ctx.eps)  # w * invstd multiplies everything
            if weight_s is not None:
                scale = scale * weight_s
            # dx = scale*dy + xhat*(-scale*mean(dy*xhat)) + (-scale*mean(dy)):
            # the last two terms are batch norm in eval mode with that weight and bias.
            grad_x = F.batch_norm(
                x,
                mean,
                var,
                -scale * mean_dy_xhat,
                -scale * mean_dy,
                training=False,
                momentum=0.0,
                eps=ctx.eps,
            )
            grad_x.addcmul_(dy, scale.view(_channel_shape(x)))
        return grad_x, grad_weight, grad_bias, None, None


def _fused_backward(
    ctx: FunctionCtx, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
    """The backward pass with torch's SyncBatchNorm kernels: one reduction pass gives
    this rank's sum(dy), sum(dy * (x - mean)) and the weight and bias gradients; one
    all_reduce makes the sums global; one element-wise pass gives dx. Means are passed
    for sums with a count of 1, so the kernel's int32 count cannot overflow on a global
    batch of more than 2^31 values per channel."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dy = dy.contiguous(memory_format=_memory_format(x))
    invstd = torch.rsqrt(var + ctx.eps)  # float32 for bf16/fp32 input, as the kernels want
    sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
        dy, x, mean, invstd, weight, need_x, need_w and weight is not None, need_b and ctx.has_bias
    )
    grad_x = None
    if need_x:
        sums = torch.cat([sum_dy, sum_dy_xmu]).double()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
        mean_dy, mean_dy_xmu = (sums / ctx.count).to(mean.dtype).chunk(2)
        one = torch.ones(1, dtype=torch.int32, device=x.device)
        grad_x = torch.batch_norm_backward_elemt(
            dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu, one
        )
    return (
        grad_x,
        grad_weight if need_w and weight is not None else None,
        grad_bias if need_b and ctx.has_bias else None,
        None,
        None,
    )


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose training statistics span every rank's batch (any input >= 2-D).

    A drop-in for ``nn.BatchNorm1d``/``2d``/``3d``: same parameters, buffers, state_dict
    keys and momentum convention (torch's 0.1 is Keras' 0.9), so checkpoints and
    torchvision exports are unchanged. Training under several ranks normalises with the
    mean and biased variance of the global batch (all ranks, all positions) and updates
    the running variance with the unbiased one; in eval mode, or with a single process,
    it is exactly ``F.batch_norm``, without communication. Every rank must call it the
    same number of times (it is a collective). Works with gloo (CPU) and NCCL (CUDA).

    ``bias=False`` drops beta (the projection head's last BN): the ``bias`` parameter is
    then ``None``, as with ``nn.BatchNorm1d(..., bias=False)`` in recent torch and as
    ssl_train.models builds it, and the output is only scaled.

    Example:
        >>> bn = GlobalBatchNorm(64)
        >>> bn(torch.randn(8, 64, 4, 4)).shape
        torch.Size([8, 64, 4, 4])
        >>> GlobalBatchNorm(128, bias=False).bias is None
        True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        bias: bool = True,
        process_group: ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        if affine and not bias:  # older torch has no `bias` argument of its own
            self.register_parameter("bias", None)
        self.process_group = process_group

    def reset_parameters(self) -> None:
        """Like torch's, but ``bias`` may be ``None`` (``bias=False``)."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"GlobalBatchNorm expects (N, C, ...) input with at least 2 dims, "
                f"got shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or world_size(self.process_group) == 1:
            return super().forward(input)  # plain F.batch_norm: local stats or running stats
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"GlobalBatchNorm({self.num_features}) got {input.shape[1]} channels "
                f"(input shape {tuple(input.shape)})"
            )
        output, mean, unbiased_var = _GlobalBatchNormFn.apply(
            input, self.weight, self.bias, self.eps, self.process_group
        )
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean, unbiased_var)
        return output

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        assert self.num_batches_tracked is not None
        assert self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as in torch
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(
            unbiased_var.to(self.running_var.dtype), alpha=factor
        )


_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def convert_to_global_bn(module: nn.Module, process_group: ProcessGroup | None = None) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d and SyncBatchNorm in ``module`` by GlobalBatchNorm.

    Parameters and buffers are the same tensor objects (so an optimizer built before the
    call still sees them, and state_dict keys and values do not change); momentum, eps,
    affine, track_running_stats and training mode carry over, and a BN without bias
    stays without bias; a SyncBatchNorm keeps its process group unless ``process_group``
    is given. Returns the converted module, which is a new object when
    ``module`` itself is a batch norm (like ``nn.SyncBatchNorm.convert_sync_batchnorm``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> type(convert_to_global_bn(net)[1]).__name__
        'GlobalBatchNorm'
    """
    if isinstance(module, _CONVERTIBLE) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            # a SyncBatchNorm keeps the group it synchronised over unless told otherwise
            process_group=process_group or getattr(module, "process_group", None),
        )
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias  # None stays None (no beta)
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
        return converted
    for name, child in module.named_children():
        new_child = convert_to_global_bn(child, process_group)
        if new_child is not child:
            module.add_module(name, new_child)
    return module
