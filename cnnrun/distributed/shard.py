"""Each rank's share of a global batch: a contiguous slice, the same rule for training and evaluation.

``trainer.batch_size`` stays the global batch. Every rank produces the same seeded global batch (same order, same
augmentation, same mixup partners) and keeps rows ``[start, stop)`` of it; sizes differ by at most one, the first
ranks taking the extra rows (NumPy's ``array_split`` rule). Rank r's loss is the mean over its ``b_r`` rows, so an
engine that averages gradients over ranks weights each rank's loss by ``size · b_r / B``: the averaged gradient is
then the gradient of the global batch's mean loss, whatever the number of ranks and however B divides.
"""

from __future__ import annotations

from typing import List, Tuple


def shard_bounds(n: int, rank: int, size: int) -> Tuple[int, int]:
    """Rows [start, stop) of an ``n``-row batch that ``rank`` of ``size`` ranks takes."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_sizes(n: int, size: int) -> List[int]:
    """How many rows each rank takes of an ``n``-row batch, in rank order."""
    return [stop - start for start, stop in (shard_bounds(n, r, size) for r in range(size))]


def take_shard(array, rank: int, size: int):
    """``rank``'s rows of ``array`` (a view: no copy)."""
    start, stop = shard_bounds(len(array), rank, size)
    return array[start:stop]


def loss_weight(shard: int, total: int, size: int) -> float:
    """The factor on a rank's mean loss that makes the mean of ``size`` ranks' gradients the global batch's."""
    return size * shard / total
