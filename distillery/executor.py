"""Where the heavy per-image work runs: the executor seam.

A heavy stage is split in two:

- a **map**: ``make_fn()`` builds, where the model lives, a function ``fn(batch) -> results`` (one result
  per item, in order). ``make_fn`` is a picklable factory (a module-level function or a
  ``functools.partial`` of one), so another executor can build it inside a worker process or a Ray actor;
- a **commit** on the driver: the stage consumes ``(batch, results)`` pairs as they arrive and writes
  tables, files and stamps itself.

:class:`LocalExecutor` runs the map in this process, batch after batch, in order: today's behaviour. A Ray
executor plugs in here (``job.executor``) without touching the stages, because the stages never see how
the batches were computed.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

__all__ = ["LocalExecutor", "EXECUTORS", "get_executor"]

BatchFn = Callable[[list], list]


class LocalExecutor:
    """Run ``make_fn()`` once here, then every batch in order."""

    name = "local"

    def map_batches(self, make_fn: Callable[[], BatchFn], items: Sequence[Any], batch_size: int, *,
                    desc: str = "", unit: str = "img", progress: bool = True) -> Iterator[tuple[list, list]]:
        """Yield ``(batch, fn(batch))`` for consecutive batches of ``items``, with a progress bar."""
        from tqdm import tqdm

        if batch_size < 1:
            raise ValueError(f"map_batches: batch_size must be >= 1, got {batch_size}.")
        items = list(items)
        if not items:
            return
        fn = make_fn()
        with tqdm(total=len(items), desc=desc, unit=unit, disable=not progress) as bar:
            for b in range(0, len(items), batch_size):
                batch = items[b:b + batch_size]
                results = fn(batch)
                if len(results) != len(batch):
                    raise RuntimeError(f"{desc or 'map_batches'}: the batch function returned {len(results)} "
                                       f"results for {len(batch)} items.")
                yield batch, results
                bar.update(len(batch))


EXECUTORS: dict[str, Callable[[], Any]] = {"local": LocalExecutor}


def get_executor(job) -> Any:
    """The executor the job names (``executor: local``)."""
    name = getattr(job, "executor", "local")
    if name not in EXECUTORS:
        raise ValueError(f"executor: unknown executor {name!r}; choose from {', '.join(EXECUTORS)}.")
    return EXECUTORS[name]()
