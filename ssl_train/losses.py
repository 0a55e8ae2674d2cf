"""The SimCLRv2 losses: NT-Xent for pretraining, soft-label distillation for step 3.

Both follow the official TF2 code (google-research/simclr) value for value, so that the
paper's hyper-parameters (temperature 0.1, distillation tau 1.0) mean the same here.
They compute in float32 (or float64 for float64 inputs) even under bf16 autocast:
logits divided by a temperature of 0.1 and summed over 2N columns lose too much in
16 bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_train.dist import gather_with_grad, rank, world_size
from ssl_train.shares import Shares

__all__ = ["batch_mean", "batch_shares", "contrastive_accuracy", "distillation_loss", "nt_xent"]

# The official code subtracts LARGE_NUM = 1e9 from each anchor's similarity to itself;
# exp() of it is exactly 0 in float32 and float64, so setting the logit to this value
# gives the same loss and gradient without a second pass over the logits.
_MASKED_LOGIT = -1e9


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def batch_shares(local: int, shares: Shares | None) -> Shares:
    """How the global batch lies over the ranks: ``shares`` (checked against this rank's
    ``local`` samples), or, when None, every rank holding ``local`` samples.

    Example:
        >>> batch_shares(8, None).sizes  # one process
        (8,)
    """
    if shares is None:
        return Shares(local * world_size(), world_size())
    if shares.world_size != world_size() or shares.size(rank()) != local:
        raise ValueError(
            f"rank {rank()} of {world_size()} holds {local} samples, but its share of a "
            f"global batch of {shares.global_batch} over {shares.world_size} ranks is "
            f"{shares.size(rank()) if shares.world_size == world_size() else '?'}"
        )
    return shares


def _contrastive_logits(
    z1: Tensor, z2: Tensor, temperature: float, memory: Tensor | None, shares: Shares
) -> tuple[Tensor, Tensor]:
    """Logits (2B, 2N [+ M]) of every local anchor against the global batch (and the M
    memory entries), and the targets.

    Rows are the local anchors [z1; z2]; columns are [z1; z2] of rank 0, then rank 1, ...
    (one all-gather of both views instead of two; ranks may hold B or B - 1 samples),
    then the memory. The softmax does not care about the column order, so this is the
    official [logits_ab, logits_aa] row up to a permutation.
    """
    batch = z1.shape[0]
    dtype = _compute_dtype(z1)
    # Autocast would run the matmuls below in bf16 whatever their inputs' dtype: logits
    # near 1/temperature = 10 would be rounded in steps of 0.06. Off for this block only.
    with torch.autocast(z1.device.type, enabled=False):
        # tf.math.l2_normalize divides by sqrt(max(sum(x^2), 1e-12)), i.e. max(norm, 1e-6)
        hidden = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1, eps=1e-6)
        # (2N, D), rank-major: [h1_r0; h2_r0; h1_r1; ...]
        keys = gather_with_grad(hidden, [2 * size for size in shares.sizes])
        logits = (hidden / temperature) @ keys.T  # scale the small side, not the (2B, 2N) one
        offset = 2 * shares.start(rank())
        # anchor i's own column is offset + i: a diagonal of the (2B, 2N) block
        logits.diagonal(offset).fill_(_MASKED_LOGIT)
        rows = torch.arange(2 * batch, device=hidden.device)
        targets = (rows + batch) % (2 * batch) + offset  # the other view of the same image
        if memory is not None and memory.shape[0]:
            negatives = memory.detach().to(dtype)  # unit vectors from ContrastiveMemory
            logits = torch.cat([logits, (hidden / temperature) @ negatives.T], dim=1)
    return logits, targets


def _check_views(z1: Tensor, z2: Tensor) -> None:
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"nt_xent needs two (batch, dim) tensors of the same shape, got "
            f"{tuple(z1.shape)} and {tuple(z2.shape)}"
        )


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float = 0.1,
    memory: Tensor | None = None,
    shares: Shares | None = None,
) -> Tensor:
    """NT-Xent (SimCLR's contrastive loss) of two views' projections, as in the official code.

    Each of the 2B local anchors has its other view as the positive and the 2N-2 other
    projections of the global batch (N samples over all ranks, gathered from every rank
    with gradient) as negatives; its similarity to itself is masked out. Returns the sum
    over the B local pairs of (loss of view 1 + loss of view 2) divided by N / W
    (``shares``: how the N samples lie over the W ranks, by default B on every rank; ranks
    may hold shares that differ by one): on one process the mean over pairs, the
    official scale (twice lightly's NTXentLoss, which averages over 2B anchors). Under
    DDP the gradient averaged over ranks is exactly the single-process gradient on the
    global batch, and so is the mean of the ranks' losses, at any world size.

    With ``memory`` (M unit-length projections of earlier batches by SimCLRv2's memory
    network, ``ssl_train.contrastive_memory``; no gradient flows into them), every anchor's
    denominator also holds them. For anchor i with normalized projection h_i, positive p
    and global batch projections h_k:

        loss_i = -log( exp(h_i.h_p / t) /
                       ( sum_{k != i} exp(h_i.h_k / t) + sum_{m=1..M} exp(h_i.m_m / t) ) )

    where the first sum runs over the 2N - 1 other projections of the global batch (the
    positive included) and the second over the memory. Without memory (None, or no
    entry yet) the loss is exactly the one above.

    Example:
        >>> z1, z2 = torch.randn(8, 128), torch.randn(8, 128)
        >>> loss = nt_xent(z1, z2, temperature=0.1)
        >>> loss.shape
        torch.Size([])
    """
    _check_views(z1, z2)
    shares = batch_shares(z1.shape[0], shares)
    logits, targets = _contrastive_logits(z1, z2, temperature, memory, shares)
    return F.cross_entropy(logits, targets, reduction="sum") / shares.mean_divisor


@torch.no_grad()
def contrastive_accuracy(z1: Tensor, z2: Tensor, shares: Shares | None = None) -> Tensor:
    """How often view 1's positive has the highest logit (the official ``contrast_acc``).

    A cheap sanity metric for pretraining: near 1/(2N) at the start, rising as the
    representation learns. Averaged over the local anchors of view 1; it all-gathers
    like ``nt_xent``, so every rank must call it.

    Example:
        >>> z = torch.randn(8, 128)
        >>> float(contrastive_accuracy(z, z))  # identical views: the positive always wins
        1.0
    """
    _check_views(z1, z2)
    shares = batch_shares(z1.shape[0], shares)
    logits, targets = _contrastive_logits(z1, z2, 1.0, None, shares)
    batch = z1.shape[0]
    return batch_mean((logits[:batch].argmax(dim=1) == targets[:batch]).float(), shares)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    alpha: float = 0.0,
    shares: Shares | None = None,
) -> Tensor:
    """Soft-label distillation of SimCLRv2 step 3, as in the official distillation colab.

    ``kd = mean(tau^2 * CE(softmax(teacher / tau), student / tau))``. The tau^2 keeps the
    gradient magnitude independent of tau (Hinton et al. 2015; the official colab does
    the same); with the paper's default tau = 1 it changes nothing. The teacher is
    detached: it only provides targets.

    With ``labels`` (class indices or probabilities) and ``alpha > 0`` the result is
    ``(1 - alpha) * kd + alpha * mean(CE(labels, student))``: here alpha weighs the
    labelled term. The paper's Eq. writes alpha on the distillation term, i.e. paper
    alpha = 1 - ours.

    Example:
        >>> student, teacher = torch.randn(4, 10), torch.randn(4, 10)
        >>> distillation_loss(student, teacher, temperature=2.0).shape
        torch.Size([])
        >>> labels = torch.tensor([0, 3, 9, 1])
        >>> loss = distillation_loss(student, teacher, labels=labels, alpha=0.5)
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (weight of the labelled loss) must be in [0, 1], got {alpha}")
    if alpha > 0 and labels is None:
        raise ValueError(f"alpha={alpha} weighs a labelled loss: pass labels, or set alpha=0")
    dtype = _compute_dtype(student_logits)
    divisor = batch_shares(student_logits.shape[0], shares).mean_divisor
    student = student_logits.to(dtype)
    teacher_probs = F.softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    soft = F.cross_entropy(student / temperature, teacher_probs, reduction="sum") / divisor
    loss = temperature**2 * soft
    if labels is not None and alpha > 0:
        labels = labels if not labels.is_floating_point() else labels.to(dtype)
        hard = F.cross_entropy(student, labels, reduction="sum") / divisor
        loss = (1.0 - alpha) * loss + alpha * hard
    return loss


def batch_mean(values: Tensor, shares: Shares | None = None) -> Tensor:
    """This rank's part of the global batch's mean of per-sample ``values``: their sum
    divided by N / W, so that the mean over ranks is the global mean at any world size
    (``shares`` as for ``nt_xent``).

    Example:
        >>> float(batch_mean(torch.tensor([1.0, 0.0, 1.0, 1.0])))
        0.75
    """
    return values.sum() / batch_shares(values.shape[0], shares).mean_divisor
