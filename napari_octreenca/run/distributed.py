"""Run the tiles of a tiled OctreeNCA job on dask.distributed workers.

The run object (model, input description, settings) is sent to every worker once; each task
computes one tile, writes its chunks into the shared zarr store and marks it done, exactly as the
local loop does, so the output is the same. Levels depend on the coarser ones, so the stages run
one after the other with a barrier between them; the tiles of a stage run in parallel.

Pointing it at a real cluster: start ``dask scheduler`` and ``dask worker tcp://HOST:8786
--nthreads 1`` on machines that share the work/output folder (NFS, Lustre...), then pass
``scheduler="tcp://HOST:8786"`` (or ``octreenca segment ... --scheduler tcp://HOST:8786``).
Inputs given as a path are reopened by each worker from that path.
"""

from __future__ import annotations

from typing import Any

from ..nca.errors import Cancelled, InputError
from .inference import is_cancelled

_RUNS: dict[str, Any] = {}


def _tile_task(run: Any, stages: list[Any], stage_index: int, index: int, threads: int) -> bool:
    """Worker side: compute one tile (single-threaded torch unless told otherwise)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    # Keep one rebuilt run per job on the worker (open stores, backend) across its tasks.
    cached = _RUNS.get(run.key)
    if cached is None:
        _RUNS.clear()
        _RUNS[run.key] = cached = run
    return cached.run_tile(stages[stage_index], index)


def get_client(scheduler: Any) -> tuple[Any, bool]:
    """A ``distributed.Client`` from a Client or a scheduler address; (client, we_own_it)."""
    try:
        from distributed import Client
    except ImportError:
        raise InputError("a dask scheduler needs the distributed package: pip install distributed") from None
    if isinstance(scheduler, Client):
        return scheduler, False
    if isinstance(scheduler, str):
        try:
            return Client(scheduler, timeout="20s"), True
        except OSError as exc:
            raise InputError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from exc
    raise InputError(f"scheduler must be a dask Client or an address like tcp://host:8786, got {scheduler!r}")


def run_distributed(
    run: Any, stages: list[Any], scheduler: Any, progress: Any, cancel: Any, threads: int = 1
) -> dict[str, int]:
    """Run every stage's pending tiles on the cluster; returns computed/skipped counts."""
    from distributed import as_completed

    client, owned = get_client(scheduler)
    counts = {"computed": 0, "skipped": 0}
    try:
        [run_f] = client.scatter([run], broadcast=True)
        [stages_f] = client.scatter([stages], broadcast=True)
        for si, stage in enumerate(stages):
            n = len(stage.tiles)
            pending = [i for i in range(n) if not run.store.is_done(stage.marker(i))]
            counts["skipped"] += n - len(pending)
            futures = [
                client.submit(
                    _tile_task,
                    run_f,
                    stages_f,
                    si,
                    i,
                    threads,
                    pure=False,
                    key=f"octreenca-{run.key[:12]}-{stage.marker(i)}",
                )
                for i in pending
            ]
            done = n - len(pending)
            for fut in as_completed(futures):
                computed = fut.result()  # re-raises a worker's exception here
                counts["computed" if computed else "skipped"] += 1
                done += 1
                if progress is not None:
                    progress(
                        {
                            "stage": stage.kind,
                            "level": stage.level,
                            "seed": stage.seed,
                            "step": None,
                            "tile": done,
                            "tiles": n,
                            "computed": computed,
                        }
                    )
                if is_cancelled(cancel):
                    client.cancel(futures)
                    raise Cancelled(f"cancelled at {stage.name}, tile {done}/{n}")
    finally:
        if owned:
            client.close()
    return counts
