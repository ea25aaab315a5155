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

__all__ = ["LocalExecutor", "RayExecutor", "EXECUTORS", "get_executor"]

BatchFn = Callable[[list], list]


def _ordered(batches: list[list], results, desc: str, unit: str, progress: bool) -> Iterator[tuple[list, list]]:
    """Pair each batch with its results (in order), check the counts, and show progress."""
    from tqdm import tqdm

    with tqdm(total=sum(map(len, batches)), desc=desc, unit=unit, disable=not progress) as bar:
        for batch, res in zip(batches, results):
            if len(res) != len(batch):
                raise RuntimeError(f"{desc or 'map_batches'}: the batch function returned {len(res)} results for "
                                   f"{len(batch)} items.")
            yield batch, res
            bar.update(len(batch))


def _split(items: Sequence[Any], batch_size: int) -> list[list]:
    if batch_size < 1:
        raise ValueError(f"map_batches: batch_size must be >= 1, got {batch_size}.")
    items = list(items)
    return [items[b:b + batch_size] for b in range(0, len(items), batch_size)]


class LocalExecutor:
    """Run ``make_fn()`` once here, then every batch in order."""

    name = "local"

    def __init__(self, job=None):
        pass

    def map_batches(self, make_fn: Callable[[], BatchFn], items: Sequence[Any], batch_size: int, *,
                    desc: str = "", unit: str = "img", progress: bool = True) -> Iterator[tuple[list, list]]:
        """Yield ``(batch, fn(batch))`` for consecutive batches of ``items``, with a progress bar."""
        batches = _split(items, batch_size)
        if not batches:
            return
        fn = make_fn()
        yield from _ordered(batches, (fn(b) for b in batches), desc, unit, progress)


class _Worker:
    """A Ray actor holding one per-batch function (and so one model), built once from the factory."""

    def __init__(self, make_fn, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.fn = make_fn()

    def run(self, batch):
        return self.fn(batch)


class RayExecutor:
    """Batches on a pool of Ray actors, each holding the model (``make_fn()``), results yielded in order.

    Settings (``job.ray``): ``address`` (a cluster; null = ``RAY_ADDRESS``, else a local Ray started here),
    ``workers`` (actors; null = one per GPU of the cluster, else one per ``cpus_per_worker`` CPUs),
    ``cpus_per_worker``, ``gpus_per_worker``. The batches are the local executor's, so each image keeps the
    seed and content hash it has in a local run; only where they are computed changes.
    """

    name = "ray"

    def __init__(self, job=None):
        cfg = getattr(job, "ray", None)
        self.address = getattr(cfg, "address", None)
        self.workers = getattr(cfg, "workers", None)
        self.cpus = float(getattr(cfg, "cpus_per_worker", 1.0))
        self.gpus = float(getattr(cfg, "gpus_per_worker", 0.0))

    def _init(self):
        import os

        try:
            import ray
        except ImportError as e:
            raise ValueError("executor: ray needs the ray package: pip install 'distillery[ray]' (or use "
                             "executor: local).") from e
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS")
            kw = {"address": address} if address else {"num_cpus": os.cpu_count() or 1}
            ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True, **kw)
        return ray

    def pool_size(self, ray) -> int:
        if self.workers:
            return int(self.workers)
        res = ray.cluster_resources()
        if self.gpus > 0 and res.get("GPU"):
            return max(1, int(res["GPU"] // self.gpus))
        return max(1, int(res.get("CPU", 1) // max(self.cpus, 1e-9)))

    def map_batches(self, make_fn: Callable[[], BatchFn], items: Sequence[Any], batch_size: int, *,
                    desc: str = "", unit: str = "img", progress: bool = True) -> Iterator[tuple[list, list]]:
        batches = _split(items, batch_size)
        if not batches:
            return
        ray = self._init()
        from ray.util import ActorPool

        n = min(self.pool_size(ray), len(batches))
        actor = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus)(_Worker)
        workers = [actor.remote(make_fn, int(max(1, self.cpus))) for _ in range(n)]
        try:
            results = ActorPool(workers).map(lambda a, b: a.run.remote(b), batches)  # in submission order
            yield from _ordered(batches, results, f"{desc} (ray x{n})", unit, progress)
        finally:
            for w in workers:
                ray.kill(w)


EXECUTORS: dict[str, Callable[..., Any]] = {"local": LocalExecutor, "ray": RayExecutor}


def get_executor(job) -> Any:
    """The executor the job names (``executor: local`` or ``ray``)."""
    name = getattr(job, "executor", "local")
    if name not in EXECUTORS:
        raise ValueError(f"executor: unknown executor {name!r}; choose from {', '.join(EXECUTORS)}.")
    return EXECUTORS[name](job)
