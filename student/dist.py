"""Which process of a multi-process launch this is (``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

Training does not run data-parallel yet: this is the seam for it. Every file the student stage writes
(checkpoints, weights, config, metrics, report, the decode cache) is written by rank 0 only, so a future
``torchrun`` launch has one writer. Without those variables this is rank 0 of 1.
"""
from __future__ import annotations

import os

__all__ = ["get_dist_info", "is_main"]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; it is set by torchrun "
                         "(unset it for a single-process run).") from None


def get_dist_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment; ``(0, 1, 0)`` when not launched by torchrun."""
    rank, world_size, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if not (world_size >= 1 and 0 <= rank < world_size and local_rank >= 0):
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}: need WORLD_SIZE >= 1, "
                         "0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0 (torchrun sets them).")
    return rank, world_size, local_rank


def is_main() -> bool:
    """True in the process that writes files: rank 0 (the only one without torchrun)."""
    return get_dist_info()[0] == 0
