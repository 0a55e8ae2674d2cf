"""Global batch norm's calls into torch's kernels, against the rules of their CUDA code.

Without a GPU the CUDA kernels cannot run, but what they demand of their arguments can
be read in torch's source (aten/src/ATen/native/cuda/Normalization.cu and .cuh, torch
2.14) and checked on every call:

- ``native_batch_norm_backward``: ``save_mean`` and ``save_invstd`` must be defined
  tensors (``TORCH_INTERNAL_ASSERT(save_mean->defined(), "save_mean should always be
  defined")``; an empty one means "use the running statistics"). The CPU kernel also
  accepts None, so CPU runs never notice.
- SyncBatchNorm's kernels (``batch_norm_stats``, ``batch_norm_backward_reduce``,
  ``batch_norm_backward_elemt``) exist for CUDA only. Their statistics (mean, invstd,
  the sums) are read through accessors of the input's accumulate type (float32 for
  bf16, half and float32 input, float64 for float64); the weight is the input's dtype
  or float32 beside a 16-bit input; ``count`` is read as ``int*`` (int32); grad_output
  has the input's dtype.

``CudaKernelRules`` checks these on each call and, for the CUDA-only kernels, computes
what the CUDA code computes (written out from it below), so the fused path of
``ssl_train.dist`` runs here end to end and is compared with the plain computation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ssl_train.dist
from ssl_train.dist import _GlobalBatchNormFn

LOW_PRECISION = (torch.bfloat16, torch.float16)


def accumulate_type(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduced_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view((1, x.shape[1]) + (1,) * (x.dim() - 2))


class CudaKernelRules(TorchDispatchMode):
    """Records every aten call, raises on one that breaks a CUDA kernel's rules, and
    stands in for the CUDA-only batch-norm kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.calls.append(name)
        devices = {a.device for a in args if isinstance(a, torch.Tensor)}
        assert len(devices) <= 1, f"{name}: tensors on {devices}"
        stand_in = getattr(self, name, None)
        if stand_in is not None:
            result = stand_in(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return func(*args, **kwargs)

    @staticmethod
    def _weight_rule(name: str, x: torch.Tensor, weight: torch.Tensor | None) -> None:
        if weight is None:
            return
        mixed = x.dtype in LOW_PRECISION and weight.dtype == torch.float32
        assert weight.dtype == x.dtype or mixed, f"{name}: weight {weight.dtype} for {x.dtype}"

    @staticmethod
    def _stat_rule(name: str, x: torch.Tensor, **stats: torch.Tensor) -> None:
        want = accumulate_type(x.dtype)
        for label, stat in stats.items():
            assert stat.dtype == want, f"{name}: {label} is {stat.dtype}, the kernel reads {want}"

    def native_batch_norm_backward(
        self, grad_out, x, weight, r_mean, r_var, s_mean, s_invstd, *rest
    ):
        assert s_mean is not None, "save_mean should always be defined (CUDA's assert)"
        assert s_invstd is not None, "save_invstd should always be defined (CUDA's assert)"
        return NotImplemented  # the CPU kernel computes it

    def batch_norm_stats(self, x: torch.Tensor, eps: float):
        acc = accumulate_type(x.dtype)
        xs = x.to(acc)
        mean = xs.mean(_reduced_dims(x))
        var = xs.var(_reduced_dims(x), unbiased=False)
        # InvStd: 0 when var and eps are both 0, else 1/sqrt(var + eps)
        invstd = torch.where((var == 0) & (eps == 0), 0.0, (var + eps).rsqrt())
        return mean, invstd

    def batch_norm_backward_reduce(self, dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
        name = "batch_norm_backward_reduce"
        assert dy.dtype == x.dtype, f"{name}: grad_output {dy.dtype} for input {x.dtype}"
        assert mean.dtype == invstd.dtype, "mean and invstd need to have the same data types"
        self._stat_rule(name, x, mean=mean, invstd=invstd)
        self._weight_rule(name, x, weight)
        acc = mean.dtype
        dys, xmu = dy.to(acc), x.to(acc) - _per_channel(mean, x)
        sum_dy = dys.sum(_reduced_dims(x))
        sum_dy_xmu = (dys * xmu).sum(_reduced_dims(x))
        param = weight.dtype if weight is not None else x.dtype
        return (
            sum_dy if input_g else None,
            sum_dy_xmu if input_g else None,
            (sum_dy_xmu * invstd).to(param) if weight_g else None,
            sum_dy.to(param) if bias_g else None,
        )

    def batch_norm_backward_elemt(self, dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        name = "batch_norm_backward_elemt"
        assert dy.dtype == x.dtype, f"{name}: grad_output {dy.dtype} for input {x.dtype}"
        assert count.dtype == torch.int32, f"{name}: count is {count.dtype}; the kernel reads int*"
        self._stat_rule(name, x, mean=mean, invstd=invstd, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)
        self._weight_rule(name, x, weight)
        acc = mean.dtype
        norm = 1.0 / count.to(torch.int64).sum().to(acc)
        grad_mean = _per_channel(sum_dy * norm, x)
        projection = _per_channel(invstd * invstd * sum_dy_xmu * norm, x)
        scale = invstd * (weight.to(acc) if weight is not None else 1.0)
        xmu = x.to(acc) - _per_channel(mean, x)
        dx = (dy.to(acc) - grad_mean - xmu * projection) * _per_channel(scale, x)
        return dx.to(x.dtype)


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A real gloo process group of one rank: the collectives run, the sums are ours."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _inputs(dtype: torch.dtype, weight_dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, 4, 3, generator=generator, dtype=torch.float64) * 3 + 2
    x[:, 4] = 7.0  # a constant channel: variance 0
    weight = torch.rand(5, generator=generator, dtype=torch.float64) + 0.5
    bias = torch.randn(5, generator=generator, dtype=torch.float64)
    upstream = torch.randn(6, 5, 4, 3, generator=generator, dtype=torch.float64)
    leaves = [
        x.to(dtype).requires_grad_(),
        weight.to(weight_dtype).requires_grad_(),
        bias.to(weight_dtype).requires_grad_(),
    ]
    return leaves, upstream.to(dtype)


def _global_bn(leaves, upstream, rules: CudaKernelRules | None = None):
    x, weight, bias = leaves
    with rules if rules is not None else _nothing():
        y, _, _ = _GlobalBatchNormFn.apply(x, weight, bias, 1e-5, None)
        grads = torch.autograd.grad(y, leaves, upstream)
    return y.detach(), [g.detach() for g in grads]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_the_plain_backward_gives_the_kernel_defined_save_tensors(one_rank_group: None) -> None:
    """The path every CPU run takes, and GPUs took before the fused kernels: CUDA's
    ``native_batch_norm_backward`` asserts on a None ``save_mean``."""
    rules = CudaKernelRules()
    leaves, upstream = _inputs(torch.float32, torch.float32)
    _global_bn(leaves, upstream, rules)
    assert "native_batch_norm_backward" in rules.calls


@pytest.mark.parametrize(
    ("dtype", "weight_dtype", "tolerance"),
    [
        (torch.float64, torch.float64, 1e-10),
        (torch.float32, torch.float32, 2e-5),
        (torch.bfloat16, torch.float32, 3e-2),  # what bf16 autocast hands batch norm
    ],
)
def test_the_fused_cuda_path_computes_batch_norm(
    one_rank_group: None,
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    weight_dtype: torch.dtype,
    tolerance: float,
) -> None:
    """With SyncBatchNorm's kernels (as on a GPU) the output and every gradient equal
    torch's own training-mode batch norm on the whole batch, computed in float64, and
    every kernel argument follows the CUDA code's rules."""
    leaves, upstream = _inputs(dtype, weight_dtype)
    reference = [leaf.detach().double().requires_grad_() for leaf in leaves]
    expected_y = F.batch_norm(reference[0], None, None, *reference[1:], training=True, eps=1e-5)
    expected_grads = torch.autograd.grad(expected_y, reference, upstream.double())

    rules = CudaKernelRules()
    monkeypatch.setattr(ssl_train.dist, "_fused_kernels", lambda x: True)
    y, grads = _global_bn(leaves, upstream, rules)
    for kernel in ("batch_norm_stats", "batch_norm_backward_reduce", "batch_norm_backward_elemt"):
        assert kernel in rules.calls
    assert "native_batch_norm_backward" not in rules.calls
    assert y.dtype == dtype and [g.dtype for g in grads] == [dtype, weight_dtype, weight_dtype]
    scale = expected_y.abs().max()
    assert (y.double() - expected_y).abs().max() <= tolerance * scale
    for got, want in zip(grads, expected_grads, strict=True):
        assert (got.double() - want).abs().max() <= tolerance * want.abs().max().clamp_min(1.0)


def test_nvjpeg_decodes_only_after_the_training_stream_drained(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """nvJPEG writes its outputs without waiting for the stream it is given, into blocks
    the caching allocator may have freed from kernels still queued on the training
    stream (pytorch/vision#9606): the decode must come after that stream is drained."""
    import ssl_train.data.device_decode as device_decode

    events: list[str] = []

    class Stream:
        def synchronize(self) -> None:
            events.append("stream drained")

    def current_stream(device: torch.device) -> Stream:
        assert device == torch.device("cuda", 1)
        return Stream()

    def decode_jpeg(jpegs, mode, device):
        events.append(f"decode on {device}")
        return [torch.zeros(3, 2, 2, dtype=torch.uint8) for _ in jpegs]

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(device_decode, "decode_jpeg", decode_jpeg)
    device_decode.decode_jpegs([torch.zeros(4, dtype=torch.uint8)], "cuda:1")
    assert events == ["stream drained", "decode on cuda:1"]
    events.clear()
    device_decode.decode_jpegs([torch.zeros(4, dtype=torch.uint8)], "cpu")
    assert events == ["decode on cpu"]  # libjpeg on the host: nothing to wait for
