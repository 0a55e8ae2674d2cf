"""The equality that matters: W processes, each with its share of a global batch of G
samples, compute exactly what one process computes on the whole batch, for a whole
SimCLRv2 training step, at any world size: shares of 16 over 3 ranks are 6, 5 and 5.

One step of a small SK ResNet + projection head, global BN, ``nt_xent`` and LARS runs
under real torchrun (gloo, 2 to 5 processes, DDP) and in this process on the
concatenated batch with torch's own BatchNorm. Loss, every gradient, every updated
parameter and every BN running statistic must agree within 1e-5 relative. Breaking the
gradient of the all-gather (a classic bug) must make the comparison fail.
"""

from __future__ import annotations

import pytest
import torch

GLOBAL_PAIRS = 16
IMAGE = 16
LR, WEIGHT_DECAY = 0.6, 1e-4
MEMORY_SIZE = 40


def _model() -> torch.nn.Module:
    from ssl_train.models import SimCLRv2, resnet

    torch.manual_seed(0)
    backbone = resnet(18, 0.125, sk_ratio=0.0625, small_images=True)
    model = SimCLRv2(backbone, head_layers=3, proj_dim=16).double()
    for module in model.modules():  # start from non-trivial BN scales so every path matters
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
    return model


def _views() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    shape = (GLOBAL_PAIRS, 3, IMAGE, IMAGE)
    return (
        torch.randn(shape, generator=generator, dtype=torch.float64),
        torch.randn(shape, generator=generator, dtype=torch.float64),
    )


def _memory(model: torch.nn.Module):
    """SimCLRv2's memory, partly filled: this step's 32 entries wrap its ring of 40."""
    from ssl_train.contrastive_memory import ContrastiveMemory

    memory = ContrastiveMemory(model, size=MEMORY_SIZE, momentum=0.9, dim=16)
    rows = torch.randn(13, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    memory._write(torch.nn.functional.normalize(rows, dim=1))
    return memory


def _step(
    model: torch.nn.Module,
    trained: torch.nn.Module,
    view1: torch.Tensor,
    view2: torch.Tensor,
    memory=None,
    shares=None,
):
    from ssl_train.losses import nt_xent
    from ssl_train.optim import LARS, lars_param_groups

    optimizer = LARS(lars_param_groups(trained, weight_decay=WEIGHT_DECAY), lr=LR)
    projection = model(torch.cat([view1, view2])).projection
    z1, z2 = projection.chunk(2)
    negatives = memory.negatives() if memory is not None else None
    loss = nt_xent(z1, z2, temperature=0.1, memory=negatives, shares=shares)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trained.named_parameters()}
    optimizer.step()
    if memory is not None:  # what PretrainTask.after_step does
        memory.update(trained)
        memory.push(torch.cat([view1, view2]), shares)
    return loss.detach(), grads


def _memory_snapshot(memory) -> dict[str, list]:
    state = {f"memory:{n}": v.double().flatten().tolist() for n, v in memory.state_dict().items()}
    return state


def _snapshot(trained: torch.nn.Module) -> dict[str, list]:
    state = {f"param:{n}": p.detach().flatten().tolist() for n, p in trained.named_parameters()}
    for name, buffer in trained.named_buffers():
        if "running_" in name:
            state[f"buffer:{name}"] = buffer.flatten().tolist()
    return state


def distributed_step(break_gather: bool, with_memory: bool = False) -> dict:
    """One training step on this rank's share of the global batch (runs under torchrun)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import ssl_train.dist
    import ssl_train.losses
    from ssl_train.dist import convert_to_global_bn

    if break_gather:  # the classic bug: other ranks' embeddings carry no gradient

        def gather_without_grad(x: torch.Tensor, sizes=None, group=None) -> torch.Tensor:
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x.detach())
            parts[dist.get_rank()] = x
            return torch.cat(parts)

        for module in (ssl_train.dist, ssl_train.losses):
            if hasattr(module, "gather_with_grad"):
                module.gather_with_grad = gather_without_grad

    from ssl_train.shares import Shares

    rank, world = dist.get_rank(), dist.get_world_size()
    shares = Shares(GLOBAL_PAIRS, world)
    start, end = shares.bounds(rank)
    view1, view2 = (v[start:end] for v in _views())
    plain = _model()
    memory = _memory(plain) if with_memory else None  # built as build_pretrain does
    model = convert_to_global_bn(plain)
    if memory is not None:  # as the loop converts it: global batch statistics
        memory.network = convert_to_global_bn(memory.network)
    ddp = DistributedDataParallel(model)
    loss, grads = _step(ddp, model, view1, view2, memory, shares)
    dist.all_reduce(loss)  # the global loss: the mean of the ranks' parts of it
    result = {
        "loss": loss.item() / world,
        "grads": {n: g.flatten().tolist() for n, g in grads.items()},
    }
    result.update(_snapshot(model))
    if memory is not None:
        result.update(_memory_snapshot(memory))
        result["memory_same_on_every_rank"] = _same_on_every_rank(memory)
    return result if rank == 0 else {"loss": result["loss"]}


def _same_on_every_rank(memory) -> bool:
    import torch.distributed as dist

    flat = torch.cat([v.double().flatten() for v in memory.state_dict().values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, flat) for g in gathered)


def _single_process_reference(with_memory: bool = False) -> dict:
    model = _model()
    memory = _memory(model) if with_memory else None
    loss, grads = _step(model, model, *_views(), memory)
    result = {"loss": loss.item(), "grads": {n: g.flatten().tolist() for n, g in grads.items()}}
    result.update(_snapshot(model))
    if memory is not None:
        result.update(_memory_snapshot(memory))
    return result


def _assert_equal(distributed: dict, reference: dict) -> None:
    def close(a: list, b: list, what: str) -> None:
        torch.testing.assert_close(
            torch.tensor(a, dtype=torch.float64),
            torch.tensor(b, dtype=torch.float64),
            rtol=1e-5,
            atol=1e-9,
            msg=lambda m: f"{what}: {m}",
        )

    close([distributed["loss"]], [reference["loss"]], "loss")
    assert distributed["grads"].keys() == reference["grads"].keys()
    for name in reference["grads"]:
        close(distributed["grads"][name], reference["grads"][name], f"gradient of {name}")
    state_keys = [k for k in reference if ":" in k]
    assert sorted(k for k in distributed if ":" in k) == sorted(state_keys)
    for key in state_keys:
        close(distributed[key], reference[key], key)


@pytest.fixture(scope="module")
def reference() -> dict:
    return _single_process_reference()


@pytest.fixture(scope="module")
def memory_reference() -> dict:
    return _single_process_reference(with_memory=True)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [3, 5])
def test_with_the_memory_w_processes_equal_one_process(
    world_size: int, memory_reference: dict
) -> None:
    """The same step with SimCLRv2's memory: its negatives in the loss, then the moving
    average and the buffer's new (wrapping) entries, equal on every rank and to one
    process's; at 3 and 5 ranks the shares of 16 are uneven (6, 5, 5 and 4, 3, 3, 3, 3)."""
    from distributed import run_under_torchrun

    results = run_under_torchrun(distributed_step, world_size, False, True, timeout_s=240)
    assert results[0].pop("memory_same_on_every_rank")
    _assert_equal(results[0], memory_reference)
    assert any(k.startswith("memory:network.") for k in memory_reference)


def test_the_memory_changes_the_step(reference: dict, memory_reference: dict) -> None:
    """Guards the memory comparison: its negatives change the loss, and the step wraps the
    buffer (13 entries + 16 new in a ring of 20)."""
    assert memory_reference["loss"] > reference["loss"]
    assert memory_reference["memory:filled"] == [MEMORY_SIZE]
    assert memory_reference["memory:position"] == [(13 + 2 * GLOBAL_PAIRS) % MEMORY_SIZE]
    assert 13 + 2 * GLOBAL_PAIRS > MEMORY_SIZE  # the step's entries wrap the ring


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [4, 3])
def test_w_processes_equal_one_process_on_the_global_batch(
    world_size: int, reference: dict
) -> None:
    from distributed import run_under_torchrun

    results = run_under_torchrun(distributed_step, world_size, False, timeout_s=240)
    assert len({r["loss"] for r in results}) == 1  # every rank reports the same global loss
    _assert_equal(results[0], reference)


@pytest.mark.slow
def test_breaking_the_gather_gradient_breaks_the_equality(reference: dict) -> None:
    from distributed import run_under_torchrun

    broken = run_under_torchrun(distributed_step, 2, True, timeout_s=240)[0]
    torch.testing.assert_close(
        torch.tensor(broken["loss"], dtype=torch.float64),
        torch.tensor(reference["loss"], dtype=torch.float64),
    )  # the forward pass is still right ...
    with pytest.raises(AssertionError, match="gradient of"):
        _assert_equal(broken, reference)  # ... but the gradients are not


def test_the_compared_step_really_moves_every_parameter_and_statistic(reference: dict) -> None:
    """Guards the equality tests against comparing things that never changed."""
    initial = _snapshot(_model())
    moved = [
        k for k in initial if not torch.equal(torch.tensor(initial[k]), torch.tensor(reference[k]))
    ]
    assert len(moved) == len(initial), sorted(set(initial) - set(moved))
    assert all(any(v != 0 for v in g) for g in reference["grads"].values())
