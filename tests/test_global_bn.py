"""GlobalBatchNorm is nn.BatchNorm on the global batch: alone, and across real gloo ranks.

The torchrun worker below splits fixed global batches between the ranks, runs
GlobalBatchNorm on each part and compares with one nn.BatchNorm on the whole batch
(computed in float64 on every rank), while counting every collective it issues.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ssl_train.dist import GlobalBatchNorm, convert_to_global_bn

from distributed import run_under_torchrun

pytestmark = pytest.mark.timeout(120)


def _reference_bn(dim: int, channels: int, **kwargs) -> nn.modules.batchnorm._BatchNorm:
    bias = kwargs.pop("bias", True)
    bn = (nn.BatchNorm1d if dim in (2, 3) else nn.BatchNorm2d)(channels, **kwargs)
    if not bias:
        bn.register_parameter("bias", None)
    return bn


def _randomise_affine(bn: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen))


def _batch(shape: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An input far from zero mean / unit variance, and the weights of the test loss."""
    gen = torch.Generator().manual_seed(seed)
    channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, generator=gen) * (torch.rand(channel, generator=gen) * 3 + 0.1)
    x = x + torch.randn(channel, generator=gen) * 4
    return x, torch.randn(shape, generator=gen)


# --- single process ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ([6, 5, 3, 4], {}),
        ([9, 7], {"bias": False}),
        ([4, 3, 5], {"momentum": None}),
        ([6, 5, 3, 4], {"affine": False}),
    ],
)
def test_single_process_equals_torch_batch_norm(shape: list[int], kwargs: dict) -> None:
    gen = torch.Generator().manual_seed(0)
    ref = _reference_bn(len(shape), shape[1], **kwargs)
    _randomise_affine(ref, gen)
    ours = convert_to_global_bn(copy.deepcopy(ref))
    assert isinstance(ours, GlobalBatchNorm)
    for step in range(3):
        x, w = _batch(shape, seed=step)
        outs, grads = [], []
        for bn in (ref, ours):
            xr = x.clone().requires_grad_()
            out = bn(xr)
            (out * w).sum().backward()
            outs.append(out)
            grads.append([xr.grad] + [p.grad.clone() for p in bn.parameters()])
            bn.zero_grad()
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
        for got, expected in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for name, buffer in ref.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buffer, rtol=0, atol=0)
    ref.eval()
    ours.eval()
    x, _ = _batch(shape, seed=9)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_constructor_matches_torch_layout() -> None:
    bn = GlobalBatchNorm(4, bias=False)
    assert bn.bias is None
    assert list(bn.state_dict()) == ["weight", "running_mean", "running_var", "num_batches_tracked"]
    assert list(GlobalBatchNorm(4).state_dict()) == list(nn.BatchNorm2d(4).state_dict())
    bn.reset_parameters()  # must not trip over the missing bias
    with pytest.raises(ValueError, match="at least 2 dims"):
        GlobalBatchNorm(4)(torch.zeros(4))


def test_convert_to_global_bn_replaces_every_batch_norm_and_keeps_state() -> None:
    no_beta = nn.BatchNorm1d(6, eps=1e-3, momentum=0.01)
    no_beta.register_parameter("bias", None)
    frozen = nn.BatchNorm2d(4, affine=True)
    frozen.weight.requires_grad_(False)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        frozen,
        nn.SyncBatchNorm(4, momentum=None),
        nn.BatchNorm2d(4, affine=False, track_running_stats=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Sequential(nn.Linear(4, 6, bias=False), no_beta),
    )
    model[1].eval()
    with torch.no_grad():  # make the state worth comparing
        for i, m in enumerate(model.modules()):
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(i)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    old_params = [list(m.parameters()) for m in old]

    converted = convert_to_global_bn(model)

    assert converted is model
    new = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(new) == 5
    assert all(type(m) is GlobalBatchNorm for m in new)
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    for o, n, params in zip(old, new, old_params, strict=True):
        assert (n.eps, n.momentum, n.affine, n.track_running_stats, n.training) == (
            o.eps,
            o.momentum,
            o.affine,
            o.track_running_stats,
            o.training,
        )
        assert all(a is b for a, b in zip(n.parameters(), params, strict=True))
    assert model[7][1].bias is None
    assert not model[2].weight.requires_grad
    assert model[2].bias.requires_grad
    model(torch.randn(2, 3, 8, 8))  # and it still runs
    # a bare batch norm comes back as a new module
    assert isinstance(convert_to_global_bn(nn.BatchNorm1d(3)), GlobalBatchNorm)


# --- across real ranks ------------------------------------------------------------------

_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all",
    "barrier",
)


def _count_collectives(counts: dict[str, int]) -> None:
    """Wrap torch.distributed's collectives so that every call is counted by name."""
    for name in _COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:  # a rank with an empty batch
        return 0.0 if got.shape == expected.shape else float("inf")
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def global_bn_on_my_part(configs: list[dict]) -> list[dict]:
    """Worker: per config, 3 training steps + eval on this rank's rows vs BN on all rows."""
    counts: dict[str, int] = {}
    _count_collectives(counts)
    me = dist.get_rank()
    results = []
    for config in configs:
        shape, split, kwargs = config["shape"], config["split"], config["kwargs"]
        start, stop = sum(split[:me]), sum(split[: me + 1])
        gen = torch.Generator().manual_seed(1)
        ref = _reference_bn(len(shape), shape[1], **kwargs)
        _randomise_affine(ref, gen)
        ours = convert_to_global_bn(copy.deepcopy(ref))
        ref.double()
        errors: dict[str, float] = {}
        per_step_counts = []
        local_param_grads = []
        for step in range(3):
            x, w = _batch(shape, seed=10 * step + len(shape))
            if config.get("constant_parts"):  # ReLU-dead feature maps, a dead channel
                x[::2, 1] = 0.0  # constant rows: zero variance per (sample, channel)
                x[:, 2] = 0.0  # zero variance over the whole global batch
            if config.get("bf16"):  # the reference sees exactly what the bf16 model sees
                x = x.bfloat16().float()
            xr = x.double().requires_grad_()
            expected = ref(xr)
            (expected * w).sum().backward()

            mine = x[start:stop].clone()
            if config.get("channels_last"):
                mine = mine.to(memory_format=torch.channels_last)
            mine.requires_grad_()
            counts.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.get("bf16", False)):
                out = ours(mine.bfloat16() if config.get("bf16") else mine)
            forward_counts = dict(counts)
            (out.float() * w[start:stop]).sum().backward()
            per_step_counts.append([forward_counts, dict(counts)])

            for key, got, want in (
                ("output", out, expected[start:stop]),
                ("input_grad", mine.grad, xr.grad[start:stop]),
            ):
                errors[key] = max(errors.get(key, 0.0), _relative(got, want))
            local_param_grads.append(
                {
                    name: [p.grad.tolist(), dict(ref.named_parameters())[name].grad.tolist()]
                    for name, p in ours.named_parameters()
                }
            )
            ours.zero_grad()
            ref.zero_grad()
        for name, buffer in ref.named_buffers():
            if buffer.is_floating_point():
                errors[name] = _relative(dict(ours.named_buffers())[name], buffer)
            else:
                errors[name] = float(dict(ours.named_buffers())[name] != buffer)
        ours.eval()
        ref.eval()
        x, _ = _batch(shape, seed=99)
        counts.clear()
        with torch.no_grad():
            errors["eval_output"] = _relative(ours(x[start:stop]), ref(x[start:stop].double()))
        results.append(
            {
                "errors": errors,
                "counts": per_step_counts,
                "eval_counts": dict(counts),
                "param_grads": local_param_grads,
            }
        )
    return results


_CONFIGS = [
    {"name": "2d-image", "shape": [8, 6, 5, 4], "split": [4, 4], "kwargs": {}},
    {
        "name": "constant-parts",
        "shape": [8, 4, 3, 3],
        "split": [4, 4],
        "kwargs": {},
        "constant_parts": True,
    },
    {"name": "head-no-beta", "shape": [10, 7], "split": [5, 5], "kwargs": {"bias": False}},
    {
        "name": "1d-seq-uneven-cumulative",
        "shape": [7, 3, 5],
        "split": [2, 5],
        "kwargs": {"momentum": None},
    },
    {
        "name": "no-affine-channels-last",
        "shape": [6, 4, 3, 3],
        "split": [3, 3],
        "kwargs": {"affine": False},
        "channels_last": True,
    },
    {"name": "one-rank-empty", "shape": [6, 3, 2, 2], "split": [0, 6], "kwargs": {}},
    {"name": "bf16-autocast", "shape": [8, 6, 5, 4], "split": [4, 4], "kwargs": {}, "bf16": True},
]


@pytest.mark.slow
def test_global_bn_across_two_ranks_equals_batch_norm_on_the_global_batch() -> None:
    per_rank = run_under_torchrun(global_bn_on_my_part, 2, _CONFIGS)
    for i, config in enumerate(_CONFIGS):
        bf16 = config.get("bf16", False)
        # bf16: the statistics must still be float32-exact (running stats); outputs and
        # gradients are bf16 tensors, so they are only as close as bf16 rounding allows.
        tolerance = {"output": 1e-2, "input_grad": 1e-2} if bf16 else {}
        for rank_result in per_rank:
            result = rank_result[i]
            for key, error in result["errors"].items():
                assert error <= tolerance.get(key, 1e-5), (config["name"], key, error)
            # one all_reduce per forward, one per backward, and no other collective
            for forward_counts, total_counts in result["counts"]:
                assert forward_counts == {"all_reduce": 1}, (config["name"], forward_counts)
                assert total_counts == {"all_reduce": 2}, (config["name"], total_counts)
            assert result["eval_counts"] == {}, config["name"]
        # parameter gradients: each rank holds its own part; their sum is the full gradient
        for step in range(3):
            for name, (_, expected) in per_rank[0][i]["param_grads"][step].items():
                summed = sum(torch.tensor(r[i]["param_grads"][step][name][0]) for r in per_rank)
                error = _relative(summed, torch.tensor(expected))
                assert error <= (1e-2 if bf16 else 1e-5), (config["name"], name, error)
