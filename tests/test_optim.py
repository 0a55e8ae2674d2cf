"""LARS, learning-rate scaling and the schedule against hand-computed values.

Expected LARS updates are computed here in float64 with plain tensor arithmetic, straight
from the official SimCLR formula, never by calling the optimizer's own code.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import Tensor, nn

from ssl_train import optim
from ssl_train.dist import GlobalBatchNorm
from ssl_train.models.resnet import resnet
from ssl_train.models.simclr import SimCLRv2
from ssl_train.optim import (
    LARS,
    WarmupCosineSchedule,
    lars_param_groups,
    scale_learning_rate,
    total_steps_for,
    warmup_cosine_lr,
    warmup_steps_for,
)

# ---------------------------------------------------------------------------- helpers


def _tiny_model(seed: int = 0) -> nn.Sequential:
    """Linear with bias -> BatchNorm1d -> Linear without bias: every kind of parameter."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2, bias=False)
    )
    with torch.no_grad():  # BN starts at gamma=1, beta=0; move it off the trivial point
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def _backward(model: nn.Module, seed: int) -> None:
    torch.manual_seed(1000 + seed)
    x = torch.randn(8, 3)
    target = torch.randn(8, 2)
    model.zero_grad(set_to_none=True)
    ((model(x) - target) ** 2).mean().backward()


def _snapshot(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    return {
        name: (p.detach().double().clone(), p.grad.detach().double().clone())
        for name, p in model.named_parameters()
    }


def _expected_lars(
    w: Tensor,
    g: Tensor,
    v: Tensor,
    *,
    lr: float,
    wd: float,
    eeta: float,
    momentum: float,
    trust: bool,
    nesterov: bool = False,
) -> tuple[Tensor, Tensor]:
    """One official-LARS update of one tensor in float64: returns (new weight, new buffer)."""
    g = g + wd * w
    ratio = 1.0
    if trust and w.norm() > 0 and g.norm() > 0:
        ratio = eeta * w.norm() / g.norm()
    scaled_lr = lr * ratio
    v = momentum * v + scaled_lr * g
    update = momentum * v + scaled_lr * g if nesterov else v
    return w - update, v


# Which parameters of _tiny_model get weight decay and trust scaling (the paper's rule).
_TRUSTED = {"0.weight": True, "0.bias": False, "1.weight": False, "1.bias": False, "3.weight": True}


# ---------------------------------------------------------------------------- LARS


def test_worked_example_two_steps() -> None:
    # w = [3, 4], g = [0.6, 0.8], wd = 0.1, lr = 1, eeta = 0.001, momentum 0.9.
    # Step 1: g' = g + 0.1 w = [0.9, 1.2]; ||w|| = 5, ||g'|| = 1.5; trust = 0.001*5/1.5 = 1/300
    #   v = (1/300) * [0.9, 1.2] = [0.003, 0.004];  w = [2.997, 3.996]
    # Step 2 (same g): w = 0.999 [3, 4], g' = [0.6, 0.8] + 0.0999 [3, 4] = 0.2999 [3, 4],
    #   so trust * g' = eeta * ||w|| * g'/||g'|| = 0.001 * 0.999 [3, 4] = [0.002997, 0.003996]
    #   v = 0.9 [0.003, 0.004] + [0.002997, 0.003996] = [0.005697, 0.007596]
    #   w = [2.997 - 0.005697, 3.996 - 0.007596] = [2.991303, 3.988404]
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([p], lr=1.0, momentum=0.9, weight_decay=0.1, eeta=0.001)

    p.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.997, 3.996], dtype=torch.float64))
    torch.testing.assert_close(
        opt.state[p]["momentum_buffer"], torch.tensor([0.003, 0.004], dtype=torch.float64)
    )
    # weight decay is added to a copy: the caller's gradient is untouched
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8], dtype=torch.float64))

    p.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.991303, 3.988404], dtype=torch.float64))


def test_worked_example_nesterov() -> None:
    # As above, step 1: v = [0.003, 0.004]; nesterov update = 0.9 v + (1/300) g'
    #   = 0.9 [0.003, 0.004] + [0.003, 0.004] = [0.0057, 0.0076];  w = [2.9943, 3.9924]
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([p], lr=1.0, momentum=0.9, weight_decay=0.1, eeta=0.001, nesterov=True)
    p.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.9943, 3.9924], dtype=torch.float64))
    torch.testing.assert_close(
        opt.state[p]["momentum_buffer"], torch.tensor([0.003, 0.004], dtype=torch.float64)
    )


def test_excluded_group_is_plain_momentum_sgd() -> None:
    # lars_exclude: no trust ratio; with wd 0 this is SGD with momentum, v = 0.9 v + lr g.
    # Step 1: v = 0.5 [1, -2] = [0.5, -1];  w = [1, 1] - v = [0.5, 2]
    # Step 2: v = 0.9 [0.5, -1] + 0.5 [1, -2] = [0.95, -1.9];  w = [-0.45, 3.9]
    p = nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    opt = LARS([{"params": [p], "lars_exclude": True}], lr=0.5)
    for _ in range(2):
        p.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
        opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.45, 3.9], dtype=torch.float64))


@pytest.mark.parametrize("nesterov", [False, True])
def test_tiny_model_two_steps_match_hand_computation(nesterov: bool) -> None:
    lr, wd, eeta, momentum = 2.0, 0.01, 0.001, 0.9
    model = _tiny_model()
    opt = LARS(
        lars_param_groups(model, weight_decay=wd),
        lr=lr,
        eeta=eeta,
        momentum=momentum,
        nesterov=nesterov,
    )
    buffers = {
        name: torch.zeros_like(p, dtype=torch.float64) for name, p in model.named_parameters()
    }
    for step in range(2):
        _backward(model, step)
        before = _snapshot(model)
        opt.step()
        for name, p in model.named_parameters():
            w, g = before[name]
            trusted = _TRUSTED[name]
            expected, buffers[name] = _expected_lars(
                w,
                g,
                buffers[name],
                lr=lr,
                wd=wd if trusted else 0.0,
                eeta=eeta,
                momentum=momentum,
                trust=trusted,
                nesterov=nesterov,
            )
            torch.testing.assert_close(
                p.detach().double(), expected, rtol=1e-6, atol=1e-7, msg=f"{name}, step {step}"
            )
            torch.testing.assert_close(
                opt.state[p]["momentum_buffer"].double(), buffers[name], rtol=1e-6, atol=1e-8
            )
            if step == 0:
                # The data discriminates: treating this tensor the other way (trust + decay
                # vs plain momentum SGD) would give a clearly different weight.
                other, _ = _expected_lars(
                    w,
                    g,
                    torch.zeros_like(w),
                    lr=lr,
                    wd=0.0 if trusted else wd,
                    eeta=eeta,
                    momentum=momentum,
                    trust=not trusted,
                    nesterov=nesterov,
                )
                assert (other - expected).abs().max() > 1e-3, name


def test_zero_weight_and_zero_grad_use_trust_ratio_one() -> None:
    zero_w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    zero_g = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([zero_w, zero_g], lr=0.5, weight_decay=0.0, eeta=0.001)

    # ||w|| = 0: trust 1, so the step is plain lr * g = 0.5 * [1, 2, -2]
    zero_w.grad = torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64)
    # ||g|| = 0: trust 1 (not 0/0 = nan), and the step is 0
    zero_g.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(
        zero_w.detach(), torch.tensor([-0.5, -1.0, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(zero_g.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64))

    # A zero gradient after a real one still coasts on momentum with trust 1:
    # w = [2.997, 3.996] after the first step (see the worked example), v = [0.003, 0.004];
    # then g = 0: v = 0.9 v = [0.0027, 0.0036], w = [2.9943, 3.9924]
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([p], lr=1.0, weight_decay=0.1)
    p.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    opt.step()
    p.grad = torch.zeros(2, dtype=torch.float64)
    opt.param_groups[0]["weight_decay"] = 0.0
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.9943, 3.9924], dtype=torch.float64))


def test_zero_grad_with_weight_decay_uses_decay_as_gradient() -> None:
    # g = 0, wd = 0.1: g' = 0.1 w, trust = eeta ||w|| / (0.1 ||w||) = 0.01,
    # step = lr * 0.01 * 0.1 w = 0.001 w (lr 1): w = 0.999 * [3, 4]
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([p], lr=1.0, weight_decay=0.1, eeta=0.001)
    p.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.997, 3.996], dtype=torch.float64))


def test_params_without_grad_are_skipped() -> None:
    used = nn.Parameter(torch.ones(2))
    unused = nn.Parameter(torch.ones(2))
    opt = LARS([used, unused], lr=0.1)
    used.grad = torch.ones(2)
    opt.step()
    assert torch.equal(unused.detach(), torch.ones(2))
    assert unused not in opt.state
    assert not torch.equal(used.detach(), torch.ones(2))


def test_float32_default_groups_give_every_tensor_trust_scaling() -> None:
    # Without lars_param_groups nothing is excluded (as the official optimizer without
    # exclusion lists): the bias gets the trust ratio too.
    bias = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = LARS([bias], lr=1.0)
    bias.grad = torch.tensor([0.6, 0.8])
    opt.step()  # trust = 0.001 * 5 / 1: w - 0.005 g
    torch.testing.assert_close(bias.detach(), torch.tensor([2.997, 3.996]))
    assert bias.dtype == torch.float32


def test_invalid_hyper_parameters_are_refused() -> None:
    p = [nn.Parameter(torch.ones(1))]
    with pytest.raises(ValueError, match="momentum"):
        LARS(p, lr=0.1, momentum=-0.9)
    with pytest.raises(ValueError, match="eeta"):
        LARS(p, lr=0.1, eeta=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        LARS(p, lr=0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match="lr"):
        LARS(p, lr=-1.0)


def test_state_dict_round_trip_resumes_identically() -> None:
    def make() -> tuple[nn.Module, LARS]:
        model = _tiny_model(seed=3)
        return model, LARS(lars_param_groups(model, weight_decay=1e-4), lr=1.5)

    model_a, opt_a = make()
    model_b, opt_b = make()
    for step in range(2):
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            _backward(model, step)
            opt.step()

    # Save b mid-way through a file-like object, as a checkpoint would, and resume fresh.
    blob = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    model_c, opt_c = make()
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    model_d, opt_d = make()  # same weights, but a fresh (zero) momentum buffer
    model_d.load_state_dict(saved["model"])

    for step in range(2, 5):
        for model, opt in ((model_a, opt_a), (model_c, opt_c), (model_d, opt_d)):
            _backward(model, step)
            opt.step()

    for (name, pa), pc in zip(model_a.named_parameters(), model_c.parameters(), strict=True):
        assert torch.equal(pa, pc), name
    # the momentum buffer is what made the difference
    assert not all(
        torch.equal(pa, pd)
        for pa, pd in zip(model_a.parameters(), model_d.parameters(), strict=True)
    )
    assert [g["lars_exclude"] for g in opt_c.param_groups] == [False, True]


# ---------------------------------------------------------------------------- param groups


class _OddlyNamed(nn.Module):
    """Names that would fool name matching: norms called 'proj', a Linear called 'bn'."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)  # weight 4-D, bias 1-D
        self.proj = nn.BatchNorm2d(4)
        self.mixer = nn.GroupNorm(2, 4)
        self.tokens = nn.LayerNorm((4, 5))  # 2-D weight: excluded only by its type
        self.gbn = GlobalBatchNorm(4)
        self.bn = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 10)


def test_param_groups_by_module_type_and_shape() -> None:
    model = _OddlyNamed()
    decayed, excluded = lars_param_groups(model, weight_decay=1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 1e-4 and decayed["lars_exclude"] is False
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    assert sorted(names[id(p)] for p in decayed["params"]) == [
        "bn.weight",
        "conv.weight",
        "head.weight",
    ]
    assert sorted(names[id(p)] for p in excluded["params"]) == [
        "conv.bias",
        "gbn.bias",
        "gbn.weight",
        "head.bias",
        "mixer.bias",
        "mixer.weight",
        "proj.bias",
        "proj.weight",
        "tokens.bias",
        "tokens.weight",
    ]


def test_param_groups_extra_exclusions_and_frozen() -> None:
    model = _OddlyNamed()
    # the official code also excludes its supervised head ('head_supervised')
    groups = lars_param_groups(model, 1e-4, exclude=lambda name, p: name.startswith("head."))
    assert {id(p) for p in groups[0]["params"]} == {id(model.conv.weight), id(model.bn.weight)}
    assert id(model.head.weight) in {id(p) for p in groups[1]["params"]}

    model.conv.requires_grad_(False)
    groups = lars_param_groups(model, 1e-4)
    listed = {id(p) for g in groups for p in g["params"]}
    assert id(model.conv.weight) not in listed and id(model.conv.bias) not in listed


def test_param_groups_of_a_norm_only_model_exclude_everything() -> None:
    bn = nn.BatchNorm1d(4)
    groups = lars_param_groups(bn, weight_decay=1e-4)
    assert [p for g in groups if not g["lars_exclude"] for p in g["params"]] == []
    excluded = [p for g in groups if g["lars_exclude"] for p in g["params"]]
    assert {id(p) for p in excluded} == {id(bn.weight), id(bn.bias)}


def test_param_groups_on_simclr_model() -> None:
    model = SimCLRv2(resnet(18, 0.25, small_images=True), num_classes=10)
    decayed, excluded = lars_param_groups(
        model, 1e-6, exclude=lambda name, p: name.startswith("classifier.")
    )
    assert all(p.ndim >= 2 for p in decayed["params"])
    n_1d = sum(1 for p in model.parameters() if p.ndim <= 1)
    assert len(excluded["params"]) == n_1d + 1  # + classifier.weight
    assert len(decayed["params"]) + len(excluded["params"]) == len(list(model.parameters()))
    LARS([decayed, excluded], lr=0.1)  # a valid optimizer from them


# ---------------------------------------------------------------------------- lr scaling


def test_scale_learning_rate() -> None:
    assert scale_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)  # 0.075 * 64
    assert scale_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)  # 0.3 * 16
    assert scale_learning_rate(0.005, 1024, "sqrt") == pytest.approx(0.16)  # 0.005 * 32
    assert scale_learning_rate(0.1, 256, "linear") == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"'linear' or 'sqrt'"):
        scale_learning_rate(0.1, 256, "log")


# ---------------------------------------------------------------------------- schedule


def test_warmup_cosine_values() -> None:
    peak, warmup, total = 4.8, 10, 110
    assert warmup_cosine_lr(0, peak, warmup, total) == 0.0
    assert warmup_cosine_lr(5, peak, warmup, total) == pytest.approx(2.4)
    assert warmup_cosine_lr(10, peak, warmup, total) == pytest.approx(peak)
    assert warmup_cosine_lr(60, peak, warmup, total) == pytest.approx(peak / 2)  # midpoint
    # a quarter into the decay: 0.5 (1 + cos(pi/4))
    assert warmup_cosine_lr(35, peak, warmup, total) == pytest.approx(
        peak * 0.5 * (1 + math.sqrt(0.5))
    )
    assert warmup_cosine_lr(110, peak, warmup, total) == 0.0
    assert warmup_cosine_lr(500, peak, warmup, total) == 0.0


def test_warmup_cosine_without_warmup() -> None:
    assert warmup_cosine_lr(0, 0.16, 0, 100) == pytest.approx(0.16)
    assert warmup_cosine_lr(50, 0.16, 0, 100) == pytest.approx(0.08)
    assert warmup_cosine_lr(100, 0.16, 0, 100) == 0.0


def test_warmup_cosine_argument_errors() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine_lr(0, 1.0, 10, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine_lr(0, 1.0, -1, 10)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosineSchedule(LARS([nn.Parameter(torch.ones(1))], lr=0.0), 1.0, 5, 3)


def test_schedule_sets_every_group_and_resumes() -> None:
    model = _tiny_model()
    opt = LARS(lars_param_groups(model, 1e-4), lr=123.0)
    sched = WarmupCosineSchedule(opt, peak_lr=4.8, warmup_steps=10, total_steps=110)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]  # step 0 applied at construction
    assert sched.step_to(60) == pytest.approx(2.4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.4, 2.4])
    assert sched.state_dict() == {"step": 60}

    opt2 = LARS(lars_param_groups(model, 1e-4), lr=123.0)
    sched2 = WarmupCosineSchedule(opt2, peak_lr=4.8, warmup_steps=10, total_steps=110)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.state_dict() == {"step": 60}
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([2.4, 2.4])
    assert sched2.step_to(61) == sched.step_to(61)


def test_step_counts_match_official_formulas() -> None:
    # ImageNet train: 1,281,167 images. warmup: round(10 * 1281167 // 4096) =
    # round(12811670 // 4096) = 3127 (4096 * 3127 = 12808192, remainder 3478)
    assert warmup_steps_for(10, 1_281_167, 4096) == 3127
    assert warmup_steps_for(0, 1_281_167, 4096) == 0
    # fractional epochs floor first: 0.5 * 1281167 = 640583.5, // 4096 = 156.0
    assert warmup_steps_for(0.5, 1_281_167, 4096) == 156
    # 800 epochs: 1281167 * 800 = 1024933600, // 4096 = 250227 (remainder 3808), + 1
    assert total_steps_for(800, 1_281_167, 4096) == 250228
    # 100 epochs: 128116700 // 4096 = 31278 (remainder 2612), + 1
    assert total_steps_for(100, 1_281_167, 4096) == 31279
    # finetune on the 1% subset (12,811 images), batch 1024, 60 epochs:
    # 768660 // 1024 = 750 (remainder 660), + 1
    assert total_steps_for(60, 12_811, 1024) == 751
    assert total_steps_for(800, 1_281_167, 4096, max_steps=1000) == 1000
    assert total_steps_for(800, 1_281_167, 4096, max_steps=0) == 250228  # 0 = not set


# ---------------------------------------------------------------------------- foreach step


def _reference_step(opt: LARS) -> None:
    """The per-parameter loop LARS.step was before it ran as foreach ops (kept verbatim).

    Reads and writes the optimizer's own groups and state, so a foreach step and this one
    can be run on twin optimizers and compared tensor for tensor.
    """
    with torch.no_grad():
        for group in opt.param_groups:
            lr, momentum, eeta = group["lr"], group["momentum"], group["eeta"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                if group["lars_exclude"]:
                    scaled_lr: Tensor | float = lr
                else:
                    w_norm = torch.linalg.vector_norm(param)
                    g_norm = torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), eeta * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    scaled_lr = lr * trust
                state = opt.state[param]
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = torch.zeros_like(param)
                step = grad * scaled_lr
                buffer.mul_(momentum).add_(step)
                param.sub_(buffer * momentum + step if group["nesterov"] else buffer)


def _simclr_like(dtype: torch.dtype) -> nn.Module:
    """A small SimCLRv2 (ResNet-18 at 1/4 width, head, classifier) in ``dtype``."""
    torch.manual_seed(0)
    return SimCLRv2(resnet(18, 0.25, small_images=True), num_classes=10).to(dtype)


def _random_grads(model: nn.Module, step: int) -> None:
    """Seeded gradients of mixed sizes, with the corner cases the trust ratio has.

    Step 0: the classifier has no gradient (skipped, its state created later) and one
    LARS tensor's gradient is 0; from step 1 a conv weight is 0 (trust 1 for it while
    its neighbours in the same stacked norm get the real ratio).
    """
    gen = torch.Generator().manual_seed(100 + step)
    for name, p in model.named_parameters():
        scale = 10.0 ** float(torch.randint(-3, 2, (), generator=gen))
        grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
        p.grad = grad.to(p.dtype)
        if step == 0 and name.startswith("classifier."):
            p.grad = None
    named = dict(model.named_parameters())
    if step == 0:
        named["backbone.layer1.0.conv1.weight"].grad.zero_()
    if step == 1:
        with torch.no_grad():
            named["backbone.layer2.0.conv2.weight"].zero_()


def _twin_optimizers(
    dtype: torch.dtype, nesterov: bool, weight_decay: float
) -> tuple[nn.Module, LARS, nn.Module, LARS]:
    models = [_simclr_like(dtype) for _ in range(2)]
    opts = [
        LARS(
            lars_param_groups(
                m, weight_decay, exclude=lambda name, p: name.startswith("classifier.")
            ),
            lr=2.5,
            nesterov=nesterov,
        )
        for m in models
    ]
    return models[0], opts[0], models[1], opts[1]


@pytest.mark.parametrize("weight_decay", [1e-4, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nesterov", [False, True])
def test_foreach_step_is_bitwise_the_per_parameter_loop(
    nesterov: bool, dtype: torch.dtype, weight_decay: float
) -> None:
    # The foreach step runs the same ops in the same order as the loop, and on CPU the
    # foreach ops are those per-tensor ops: the weights and buffers agree to the bit.
    # (With weight decay the step scales its decayed copy of the gradients in place.)
    model, opt, ref_model, ref_opt = _twin_optimizers(dtype, nesterov, weight_decay)
    groups = [len(g["params"]) for g in opt.param_groups]
    assert groups[0] > 10 and groups[1] > 10  # both kinds of group, many tensors each
    for step in range(4):
        _random_grads(model, step)
        _random_grads(ref_model, step)
        opt.step()
        _reference_step(ref_opt)
        for (name, p), ref in zip(model.named_parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(p, ref), f"{name}, step {step}"
            # the caller's gradients are left as they were (the loop never writes them)
            assert (p.grad is None and ref.grad is None) or torch.equal(p.grad, ref.grad), name
            if name.startswith("classifier.") and step == 0:
                assert p not in opt.state and ref not in ref_opt.state, name
                continue
            assert set(opt.state[p]) == {"momentum_buffer"}, name
            assert opt.state[p]["momentum_buffer"].dtype == dtype
            assert torch.equal(
                opt.state[p]["momentum_buffer"], ref_opt.state[ref]["momentum_buffer"]
            ), f"{name} buffer, step {step}"
    # the checks above are not vacuous: every parameter moved
    fresh = _simclr_like(dtype)
    for (name, p), p0 in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert not torch.equal(p, p0), name
    # checkpoints hold the optimizer state: the same layout as the loop's
    state, ref_state = opt.state_dict(), ref_opt.state_dict()
    assert state["param_groups"] == ref_state["param_groups"]
    assert {i: sorted(s) for i, s in state["state"].items()} == {
        i: ["momentum_buffer"] for i in ref_state["state"]
    }


def test_foreach_step_with_mixed_dtypes_in_a_group() -> None:
    # bf16, float32 and float64 tensors in one group are split by dtype, as torch's own
    # foreach optimizers do, and each gets the per-tensor result in its own dtype.
    def make() -> tuple[list[nn.Parameter], LARS]:
        torch.manual_seed(5)
        params = [
            nn.Parameter(torch.randn(4, 3, dtype=dtype))
            for dtype in (torch.bfloat16, torch.float32, torch.float64, torch.bfloat16)
        ]
        bias = nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
        groups = [
            {"params": params, "weight_decay": 1e-2},
            {"params": [bias], "lars_exclude": True},
        ]
        # eeta 0.5: steps of about 0.35 ||w|| (lr * eeta), which bf16 does not round away
        return [*params, bias], LARS(groups, lr=0.7, eeta=0.5, nesterov=True)

    params, opt = make()
    ref_params, ref_opt = make()
    for step in range(3):
        for ps in (params, ref_params):
            gen = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
        _reference_step(ref_opt)
        for i, (p, ref) in enumerate(zip(params, ref_params, strict=True)):
            assert p.dtype == ref.dtype and torch.equal(p, ref), f"param {i}, step {step}"
            buffer, ref_buffer = (
                opt.state[p]["momentum_buffer"],
                ref_opt.state[ref]["momentum_buffer"],
            )
            assert buffer.dtype == p.dtype and torch.equal(buffer, ref_buffer), f"buffer {i}"
    fresh, _ = make()
    assert all(not torch.equal(p, p0) for p, p0 in zip(params, fresh, strict=True))


def test_cpu_chunks_cover_every_tensor_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # On the CPU the step runs in chunks of about _CPU_CHUNK_BYTES; with a tiny budget
    # every chunk boundary of the small SimCLRv2 is crossed, and the result is unchanged.
    monkeypatch.setattr(optim, "_CPU_CHUNK_BYTES", 3000)
    model, opt, ref_model, ref_opt = _twin_optimizers(torch.float32, True, 1e-4)
    params = list(model.parameters())
    chunks = list(optim._chunks(params, params, params))
    assert len(chunks) > 20 and any(len(c[0]) > 1 for c in chunks)
    assert [id(p) for c in chunks for p in c[0]] == [id(p) for p in params]
    for step in range(3):
        _random_grads(model, step)
        _random_grads(ref_model, step)
        opt.step()
        _reference_step(ref_opt)
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, ref), name
        assert torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[ref]["momentum_buffer"])


def _syncs_on_the_host(t: Tensor) -> Tensor:
    """What the step must never do: branch in Python on a value on the device."""
    norm = torch.linalg.vector_norm(t)
    return t / norm if norm > 0 else t


def test_fake_cuda_tensors_catch_a_host_sync() -> None:
    # The no-sync test below relies on FakeTensorMode refusing every data-dependent read.
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    with FakeTensorMode():
        t = torch.ones(3, device="cuda")
        assert t.device.type == "cuda"
        with pytest.raises(DataDependentOutputException):
            _syncs_on_the_host(t)
        with pytest.raises(DataDependentOutputException):
            t.sum().item()
        with pytest.raises(DataDependentOutputException):
            float(t.sum())


@pytest.mark.parametrize("nesterov", [False, True])
def test_step_makes_no_host_sync(nesterov: bool) -> None:
    # On fake CUDA tensors (no GPU needed) any .item(), float(tensor) or Python branch on
    # a tensor value raises; a step that completes read nothing back from the device.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        with torch.device("cuda"):
            model = nn.Sequential(
                nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4)
            )
            for p in model.parameters():
                p.grad = torch.randn(p.shape)
            model[3].bias.grad = None  # a parameter without gradient, too
            extra = nn.Parameter(torch.randn(5, 5, dtype=torch.float64))
            extra.grad = torch.randn(5, 5, dtype=torch.float64)
        groups = lars_param_groups(model, weight_decay=1e-4)
        groups[0]["params"].append(extra)  # a second dtype in the LARS group
        opt = LARS(groups, lr=0.1, nesterov=nesterov)
        opt.step()
        opt.step()
        # off the CPU a group is one chunk, whatever its size
        big = [torch.empty(2**22, device="cuda") for _ in range(3)]
        assert len(list(optim._chunks(big, big, big))) == 1
        for name, p in [*model.named_parameters(), ("extra", extra)]:
            assert isinstance(p, FakeTensor) and p.device.type == "cuda", name
            if p.grad is None:
                assert p not in opt.state, name
                continue
            buffer = opt.state[p]["momentum_buffer"]
            assert buffer.device.type == "cuda" and buffer.dtype == p.dtype, name
