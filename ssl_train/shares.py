"""How a global batch is split over the ranks, at any world size.

The global batch (G samples, chosen by the data plan without regard to the world size)
is cut into W contiguous shares in canonical order whose sizes differ by at most one:
the first ``G mod W`` ranks take one sample more. Every world size from 1 to G works,
so an elastic job that loses one node of sixteen trains on at fifteen, on the very same
global batches.

Everything that depends on the batch stays a function of the global batch alone: each
rank divides its sums by ``mean_divisor`` (G / W) for its part of the global mean, so
that DDP's averaging of the W ranks' gradients gives exactly one process's gradient on
the whole batch, and the mean of the ranks' metrics is the global batch's. Gathers of
per-sample rows across ranks use ``sizes`` and ``start`` to put them in canonical order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ssl_train.errors import UserError


@dataclass(frozen=True)
class Shares:
    """The shares of a global batch of ``global_batch`` samples over ``world_size`` ranks.

    Example:
        >>> shares = Shares(16, 3)
        >>> shares.sizes, shares.start(1), shares.bounds(2), shares.largest
        ((6, 5, 5), 6, (11, 16), 6)
        >>> Shares(4096, 24).sizes[:2], Shares(4096, 8).even
        ((171, 171), True)
    """

    global_batch: int
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size {self.world_size} must be at least 1")
        if self.global_batch < self.world_size:
            raise UserError(
                f"--global-batch-size {self.global_batch} over {self.world_size} processes: "
                "every process needs at least one sample of each global batch; use at most "
                f"{self.global_batch} processes or a global batch of at least {self.world_size}"
            )

    @property
    def even(self) -> bool:
        """Every rank holds the same number of samples (the world size divides G)."""
        return self.global_batch % self.world_size == 0

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        base, extra = divmod(self.global_batch, self.world_size)
        return tuple(base + (rank < extra) for rank in range(self.world_size))

    @property
    def largest(self) -> int:
        return self.sizes[0]

    def size(self, rank: int) -> int:
        return self.sizes[rank]

    def start(self, rank: int) -> int:
        """Where rank ``rank``'s share begins in the canonical global batch."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {self.world_size}")
        base, extra = divmod(self.global_batch, self.world_size)
        return rank * base + min(rank, extra)

    def bounds(self, rank: int) -> tuple[int, int]:
        start = self.start(rank)
        return start, start + self.sizes[rank]

    @property
    def mean_divisor(self) -> float:
        """What a rank divides its sum over its samples by to get its part of the global
        mean under DDP's averaging over W ranks: G / W (exactly B when the shares are
        even, so an even split computes what it always did)."""
        return self.global_batch / self.world_size

    def describe(self) -> str:
        """The shares in a few words, for the start line.

        Example:
            >>> Shares(16, 3).describe(), Shares(16, 4).describe()
            ('6 or 5 each', '4 each')
        """
        if self.even:
            return f"{self.largest} each"
        return f"{self.largest} or {self.largest - 1} each"
