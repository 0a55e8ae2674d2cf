"""SimCLRv2's memory (``ssl_train.contrastive_memory``): the loss with buffered negatives against an
independent transcription of its formula, the ring buffer's fill and wrap, the moving
average, and the refusal of a memory the data cannot support."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_train.contrastive_memory import ContrastiveMemory
from ssl_train.losses import nt_xent
from ssl_train.models import build_model


def transcribed_loss(z1: torch.Tensor, z2: torch.Tensor, t: float, memory: torch.Tensor) -> float:
    """loss_i = -log(exp(h_i.h_p/t) / (sum_{k != i} exp(h_i.h_k/t) + sum_m exp(h_i.m/t))),
    summed over the 2N anchors and divided by N: written out anchor by anchor."""
    rows = torch.cat([z1, z2]).tolist()
    h = [[x / max(math.sqrt(sum(y * y for y in v)), 1e-6) for x in v] for v in rows]
    bank = memory.tolist()
    n = len(h) // 2

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        numerator = math.exp(dot(h[i], h[positive]) / t)
        denominator = sum(math.exp(dot(h[i], h[k]) / t) for k in range(2 * n) if k != i)
        denominator += sum(math.exp(dot(h[i], m) / t) for m in bank)
        total += -math.log(numerator / denominator)
    return total / n


def unit_rows(count: int, dim: int, seed: int) -> torch.Tensor:
    rows = torch.randn(
        count, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    return torch.nn.functional.normalize(rows, dim=1)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("entries", [0, 5, 24])
def test_the_loss_with_memory_is_the_formula(batch: int, temperature: float, entries: int) -> None:
    generator = torch.Generator().manual_seed(batch * 100 + entries)
    z1 = torch.randn(batch, 6, generator=generator, dtype=torch.float64)
    z2 = torch.randn(batch, 6, generator=generator, dtype=torch.float64)
    memory = unit_rows(entries, 6, seed=entries)
    ours = nt_xent(z1, z2, temperature, memory).item()
    assert ours == pytest.approx(transcribed_loss(z1, z2, temperature, memory), rel=1e-10)


def test_without_entries_the_loss_is_unchanged_and_memory_gets_no_gradient() -> None:
    z1 = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 8, dtype=torch.float64)
    empty = torch.zeros(0, 8, dtype=torch.float64)
    assert torch.equal(nt_xent(z1, z2, 0.1, empty), nt_xent(z1, z2, 0.1))
    bank = unit_rows(10, 8, seed=1).requires_grad_(True)
    nt_xent(z1, z2, 0.1, bank).backward()
    assert bank.grad is None and z1.grad is not None


def _memory(size: int) -> ContrastiveMemory:
    torch.manual_seed(0)
    model = build_model("tiny", None, 2, 4).double()
    return ContrastiveMemory(model, size=size, momentum=0.5, dim=4)


def test_the_buffer_fills_then_wraps_keeping_the_newest_entries() -> None:
    """Empty, partial, full and wrapped: the entries are always the newest ``size``."""
    memory = _memory(size=10)
    assert memory.negatives().shape == (0, 4)
    pushed = []
    for step in range(5):  # 3 samples x 2 views = 6 entries a step
        images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(step))
        memory.push(images.double())
        projection = memory.network(images.double()).projection
        pushed.append(torch.nn.functional.normalize(projection, dim=1, eps=1e-6))
        newest = torch.cat(pushed)[-10:]
        kept = memory.negatives()
        assert kept.shape[0] == min(10, 6 * (step + 1))
        # the same rows, wherever the ring put them
        assert sorted(map(tuple, kept.tolist())) == sorted(map(tuple, newest.tolist()))


def test_the_memory_network_is_a_moving_average_of_weights_and_statistics() -> None:
    memory = _memory(size=4)
    online = build_model("tiny", None, 2, 4).double()
    for tensor in online.state_dict().values():
        if tensor.is_floating_point():
            tensor.add_(1.0)  # the online network moved on (BN statistics too)
    before = {k: v.clone() for k, v in memory.network.state_dict().items()}
    memory.update(online)
    for name, value in memory.network.state_dict().items():
        expected = online.state_dict()[name]
        if value.is_floating_point():
            expected = 0.5 * before[name] + 0.5 * expected
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-12, msg=name)
    assert not any(p.requires_grad for p in memory.network.parameters())


def test_the_memory_projects_with_batch_statistics_and_keeps_its_averaged_ones() -> None:
    """What the online network computes in training, not in inference: with its running
    statistics a fresh network maps every image to nearly one direction, and a memory of
    that one negative collapsed the demo's pretraining (ssl_train.contrastive_memory)."""
    torch.manual_seed(0)
    online = build_model("tiny", None, 2, 16).double().train()
    memory = ContrastiveMemory(online, size=64, momentum=0.9, dim=16)
    memory.eval()  # its owner's mode does not change how it normalises
    images = torch.rand(32, 3, 16, 16, dtype=torch.float64)
    statistics = {k: v.clone() for k, v in memory.network.state_dict().items()}
    memory.push(images)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(online(images).projection, dim=1)
    torch.testing.assert_close(memory.negatives(), expected, rtol=1e-12, atol=1e-12)
    for name, value in memory.network.state_dict().items():  # running stats untouched
        torch.testing.assert_close(value, statistics[name], rtol=0, atol=0, msg=name)
    similarity = memory.negatives() @ memory.negatives().T
    off_diagonal = similarity[~torch.eye(32, dtype=torch.bool)]
    assert off_diagonal.mean() < 0.5  # distinct images, distinct negatives


def test_a_memory_as_large_as_an_epoch_is_refused_before_any_work() -> None:
    from ssl_train.errors import UserError
    from ssl_train.stages.config import StageConfig, check_memory_size

    config = StageConfig.for_stage(
        "pretrain", data="d", run_dir="r", preset="tiny", memory_size=160
    )
    with pytest.raises(UserError, match="--memory-size 160: an epoch of d trains on 160"):
        check_memory_size(config.memory_size, 160, config.data)
    check_memory_size(config.memory_size, 161, config.data)


def test_the_memory_defaults() -> None:
    """The paper's memory for Table 1's networks; the tiny presets choose per run."""
    from ssl_train.stages.config import StageConfig

    r50 = StageConfig.for_stage("pretrain", data="d", run_dir="r")
    tiny = StageConfig.for_stage("pretrain", data="d", run_dir="r", preset="tiny")
    assert (r50.memory_size, r50.memory_momentum, tiny.memory_size) == (65536, 0.999, 0)


def test_the_flags_reach_the_component_and_the_help() -> None:
    import inspect

    from ssl_train import cli, components

    parameters = inspect.signature(components.pretrain).parameters
    assert {"memory_size", "memory_momentum"} <= set(parameters)
    text = cli.build_parser()._subparsers._group_actions[0].choices["pretrain"].format_help()
    assert "--memory-size" in text and "65536 for the Table-1 presets" in " ".join(text.split())
    assert "MoCo: 0.999" in " ".join(text.split())
