"""What ranks exchange outside the model: sums, gathered rows and rank 0's objects, as NumPy values."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from cnnrun.distributed.world import SINGLE, World


class Collective(Protocol):
    """One engine's connection between the ranks of a world. Every rank calls each method in the same order."""

    world: World

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        """The element-wise sum over ranks of a float64 vector."""

    def all_gather(self, rows: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
        """Every rank's ``rows`` concatenated in rank order; rank r holds ``sizes[r]`` rows (possibly none)."""

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (a picklable object), on every rank."""

    def close(self) -> None:
        """Leave the world (the process may exit afterwards)."""


class LocalCollective:
    """The collective of a single process: everything is already here."""

    world = SINGLE

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, np.float64)

    def all_gather(self, rows: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
        return rows

    def broadcast(self, value: Any) -> Any:
        return value

    def close(self) -> None:
        pass


def any_rank(collective: Collective, flag: bool) -> bool:
    """Whether ``flag`` is true on at least one rank (every rank gets the same answer)."""
    if collective.world.size == 1:
        return flag
    return bool(collective.all_sum(np.array([1.0 if flag else 0.0]))[0] > 0)


LOCAL = LocalCollective()
