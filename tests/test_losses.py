"""The SimCLRv2 losses equal the official definitions, alone and across real ranks.

``official_nt_xent`` below is a line-by-line float64 transcription of the official TF2
``add_contrastive_loss`` (explicit one-hot labels and masks, LARGE_NUM subtraction);
``nt_xent`` must match it in value and gradient, and 2 gloo ranks under torchrun must
give the single-process loss and gradient on the global batch.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ssl_train.losses as losses
from ssl_train.losses import contrastive_accuracy, distillation_loss, nt_xent
from ssl_train.shares import Shares

from distributed import run_under_torchrun

pytestmark = pytest.mark.timeout(120)

LARGE_NUM = 1e9


def official_nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    replica_id: int = 0,
    z1_large: torch.Tensor | None = None,
    z2_large: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """google-research/simclr tf2/objective.py add_contrastive_loss, in float64.

    ``z*_large`` are the other replicas' raw projections (all replicas, in order); the
    single-replica case passes none. Returns (loss, contrast_acc).
    """

    def l2_normalize(x: torch.Tensor) -> torch.Tensor:  # tf.math.l2_normalize
        return x / torch.sqrt(torch.clamp((x * x).sum(1, keepdim=True), min=1e-12))

    hidden = l2_normalize(torch.cat([z1, z2]).double())
    hidden1, hidden2 = hidden.chunk(2)
    batch_size = hidden1.shape[0]
    if z1_large is None:
        hidden1_large, hidden2_large = hidden1, hidden2
    else:
        hidden1_large = l2_normalize(z1_large.double())
        hidden2_large = l2_normalize(z2_large.double())
    enlarged = hidden1_large.shape[0]
    labels_idx = torch.arange(batch_size) + replica_id * batch_size
    labels = F.one_hot(labels_idx, enlarged * 2).double()
    masks = F.one_hot(labels_idx, enlarged).double()

    logits_aa = hidden1 @ hidden1_large.T / temperature - masks * LARGE_NUM
    logits_bb = hidden2 @ hidden2_large.T / temperature - masks * LARGE_NUM
    logits_ab = hidden1 @ hidden2_large.T / temperature
    logits_ba = hidden2 @ hidden1_large.T / temperature

    def softmax_cross_entropy(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return -(labels * F.log_softmax(logits, dim=1)).sum(1)

    logits_a = torch.cat([logits_ab, logits_aa], 1)
    loss_a = softmax_cross_entropy(labels, logits_a)
    loss_b = softmax_cross_entropy(labels, torch.cat([logits_ba, logits_bb], 1))
    accuracy = (labels.argmax(1) == logits_a.argmax(1)).double().mean()
    return (loss_a + loss_b).mean(), accuracy


def _pairs(batch: int, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    z2 = z1 + 0.7 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return z1, z2


def _value_and_grads(loss_fn, z1: torch.Tensor, z2: torch.Tensor, temperature: float):
    z1, z2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = loss_fn(z1, z2, temperature)
    if isinstance(loss, tuple):
        loss = loss[0]
    g1, g2 = torch.autograd.grad(loss, [z1, z2])
    return loss.detach(), g1, g2


# --- single process ---------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("batch", [1, 2, 7, 64])
def test_nt_xent_equals_official_value_and_gradient(batch: int, temperature: float) -> None:
    z1, z2 = _pairs(batch, seed=batch)
    ours = _value_and_grads(nt_xent, z1, z2, temperature)
    official = _value_and_grads(official_nt_xent, z1, z2, temperature)
    assert ours[0].dtype == torch.float64
    torch.testing.assert_close(ours[0], official[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], official[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[2], official[2], rtol=1e-10, atol=1e-12)


def test_nt_xent_masks_self_similarity() -> None:
    """Identical z1 rows: unmasked, each anchor's self-logit (1/T) would swamp the loss."""
    z1 = torch.randn(1, 8, dtype=torch.float64).repeat(5, 1)
    z2 = torch.randn(5, 8, dtype=torch.float64)
    ours = _value_and_grads(nt_xent, z1, z2, 0.1)
    official = _value_and_grads(official_nt_xent, z1, z2, 0.1)
    torch.testing.assert_close(ours[0], official[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], official[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[2], official[2], rtol=1e-10, atol=1e-12)

    # the same loss without the mask is far off: the case really exercises it
    h = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = h @ h.T / 0.1
    unmasked = F.cross_entropy(logits, (torch.arange(10) + 5) % 10, reduction="sum") / 5
    assert abs(unmasked.item() - official[0].item()) > 1.0


def test_nt_xent_normalises_tiny_vectors_like_tensorflow() -> None:
    """tf.math.l2_normalize divides by max(norm, 1e-6): a near-zero projection stays short."""
    z1, z2 = _pairs(4, seed=5)
    z1[1] *= 1e-9
    ours = _value_and_grads(nt_xent, z1, z2, 0.1)
    official = _value_and_grads(official_nt_xent, z1, z2, 0.1)
    torch.testing.assert_close(ours[0], official[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], official[1], rtol=1e-10, atol=1e-12)


def test_nt_xent_computes_in_float32_for_bfloat16_inputs() -> None:
    z1, z2 = (z.bfloat16() for z in _pairs(32, dim=128, seed=3))
    loss = nt_xent(z1, z2, 0.1)
    reference, _ = official_nt_xent(z1.double(), z2.double(), 0.1)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - reference.item()) <= 1e-5 * reference.item()


def test_contrastive_accuracy_equals_official_contrast_acc() -> None:
    z1, z2 = _pairs(64, dim=4, seed=11)  # low dim: many anchors miss their positive
    _, expected = official_nt_xent(z1, z2, 0.1)
    assert 0.05 < expected.item() < 0.95
    assert contrastive_accuracy(z1, z2).item() == pytest.approx(expected.item(), abs=1e-12)


# --- distillation -----------------------------------------------------------------------

LN3 = math.log(3.0)
ENTROPY_3_1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # H([3/4, 1/4])


@pytest.mark.parametrize(
    ("student", "teacher", "tau", "labels", "alpha", "expected"),
    [
        # teacher [3/4, 1/4], student uniform: CE = ln 2
        ([[0.0, 0.0]], [[LN3, 0.0]], 1.0, None, 0.0, math.log(2.0)),
        # student equals teacher: CE = entropy of [3/4, 1/4]
        ([[LN3, 0.0]], [[LN3, 0.0]], 1.0, None, 0.0, ENTROPY_3_1),
        # tau 2 on doubled logits: same distributions, times tau^2 = 4
        ([[2 * LN3, 0.0]], [[2 * LN3, 0.0]], 2.0, None, 0.0, 4 * ENTROPY_3_1),
        # labelled term: CE(label 1, [3/4, 1/4]) = ln 4, weighed by alpha
        ([[LN3, 0.0]], [[LN3, 0.0]], 1.0, [1], 0.25, 0.75 * ENTROPY_3_1 + 0.25 * math.log(4.0)),
        # labels with alpha 0 are ignored
        ([[LN3, 0.0]], [[0.0, 0.0]], 1.0, [1], 0.0, -0.5 * (math.log(0.75) + math.log(0.25))),
    ],
)
def test_distillation_loss_hand_computed(student, teacher, tau, labels, alpha, expected) -> None:
    labels_t = None if labels is None else torch.tensor(labels)
    loss = distillation_loss(torch.tensor(student), torch.tensor(teacher), tau, labels_t, alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def _numpy_distillation(student, teacher, tau, labels, alpha):
    def log_softmax(x):
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    p = np.exp(log_softmax(teacher / tau))
    q = np.exp(log_softmax(student / tau))
    kd = tau**2 * np.mean(-(p * log_softmax(student / tau)).sum(1))
    grad = tau * (q - p) / len(student)  # d kd / d student
    if alpha:
        onehot = np.eye(student.shape[1])[labels]
        ce = np.mean(-(onehot * log_softmax(student)).sum(1))
        grad = (1 - alpha) * grad + alpha * (np.exp(log_softmax(student)) - onehot) / len(student)
        return (1 - alpha) * kd + alpha * ce, grad
    return kd, grad


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_distillation_loss_matches_numpy_and_leaves_teacher_alone(tau: float, alpha: float) -> None:
    rng = np.random.default_rng(5)
    student_np, teacher_np = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
    labels_np = rng.integers(0, 7, size=5)
    expected, expected_grad = _numpy_distillation(student_np, teacher_np, tau, labels_np, alpha)

    student = torch.tensor(student_np, requires_grad=True)
    teacher = torch.tensor(teacher_np, requires_grad=True)
    labels = torch.tensor(labels_np) if alpha else None
    loss = distillation_loss(student, teacher, temperature=tau, labels=labels, alpha=alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert teacher.grad is None
    np.testing.assert_allclose(student.grad.numpy(), expected_grad, rtol=1e-10, atol=1e-14)


def test_distillation_loss_refuses_alpha_without_labels() -> None:
    with pytest.raises(ValueError, match="pass labels"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), alpha=0.5)


# --- across real ranks ------------------------------------------------------------------


def _gather_without_grad(x: torch.Tensor, sizes=None, group=None) -> torch.Tensor:
    """The classic mistake: negatives from other ranks gathered as constants."""
    from ssl_train.dist import gather_rows

    return gather_rows(x.detach(), sizes)


def nt_xent_on_my_slice(cases: list[list]) -> list[dict]:
    """Worker: for each (global batch, temperature, seed), loss and grads on this rank's
    share (``Shares``: 16 over 3 ranks is 6, 5, 5)."""
    world, me = dist.get_world_size(), dist.get_rank()
    results = []
    for global_batch, temperature, seed in cases:
        shares = Shares(global_batch, world)
        z1, z2 = _pairs(global_batch, seed=seed)
        rows = slice(*shares.bounds(me))
        out = {}
        original = losses.gather_with_grad
        for variant, gather in (("ours", original), ("detached", _gather_without_grad)):
            losses.gather_with_grad = gather
            try:
                loss_fn = functools.partial(nt_xent, shares=shares)
                loss, g1, g2 = _value_and_grads(loss_fn, z1[rows], z2[rows], temperature)
            finally:
                losses.gather_with_grad = original
            out[variant] = {"loss": loss.item(), "g1": g1.tolist(), "g2": g2.tolist()}
        out["accuracy"] = contrastive_accuracy(z1[rows], z2[rows], shares).item()
        results.append(out)
    return results


@pytest.mark.slow
def test_nt_xent_across_ranks_equals_one_process_on_the_global_batch() -> None:
    """3 ranks, global batches of 7 (3, 2, 2), 16 (6, 5, 5) and 6 (2 each): DDP's average
    of the ranks' gradients, the mean of their losses and accuracies are one process's."""
    cases = [[7, 0.5, 21], [16, 0.1, 22], [6, 0.2, 23]]
    per_rank = run_under_torchrun(nt_xent_on_my_slice, 3, cases)
    world = len(per_rank)
    for i, (global_batch, temperature, seed) in enumerate(cases):
        z1, z2 = _pairs(global_batch, seed=seed)
        loss, g1, g2 = _value_and_grads(nt_xent, z1, z2, temperature)
        official, official_acc = official_nt_xent(z1, z2, temperature)
        torch.testing.assert_close(loss, official.detach(), rtol=1e-12, atol=0)

        def averaged(variant: str, key: str, i: int = i) -> torch.Tensor:
            # DDP averages over ranks; each rank owns the gradient of its own rows
            return torch.cat([torch.tensor(r[i][variant][key]) for r in per_rank]) / world

        mean_loss = sum(r[i]["ours"]["loss"] for r in per_rank) / world
        assert mean_loss == pytest.approx(loss.item(), rel=1e-12)
        for variant, tolerance_met in (("ours", True), ("detached", False)):
            for key, full in (("g1", g1), ("g2", g2)):
                relative = ((averaged(variant, key) - full).norm() / full.norm()).item()
                assert (relative <= 1e-6) is tolerance_met, (variant, key, relative)
        accuracy = sum(r[i]["accuracy"] for r in per_rank) / world
        # float32 hits divided by G / W (16 / 3 is not exact): within float32 rounding
        assert accuracy == pytest.approx(official_acc.item(), abs=1e-6)
