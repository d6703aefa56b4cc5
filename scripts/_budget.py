"""Shared by the model-training scripts: train with an optional wall-time budget.

When the budget runs out, training stops after the current iteration (the checkpoint is saved by
``train``) and the EMA weights of that checkpoint are used. Because the learning-rate schedule and
the data sampling depend only on the iteration count, rerunning with ``--iterations N`` (N = the
iterations reached) reproduces the same model without a budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from napari_octreenca.nca.config import ModelConfig
from napari_octreenca.nca.errors import Cancelled
from napari_octreenca.nca.octree import OctreeNCA
from napari_octreenca.run.training import TrainConfig, TrainPair, load_checkpoint, train


def print_progress(p: Any) -> None:
    """Progress line every 10 iterations (and the last)."""
    if p.iteration % 10 == 0 or p.iteration == p.iterations:
        print(
            f"it {p.iteration}/{p.iterations} loss {p.loss:.4f} dice {p.dice:.3f} lr {p.lr:.2e} {p.seconds:.0f} s",
            flush=True,
        )


def train_with_budget(
    cfg: ModelConfig | OctreeNCA,
    pairs: Sequence[TrainPair],
    tcfg: TrainConfig,
    *,
    checkpoint: str,
    resume: bool,
    max_minutes: float | None,
    callback: Callable[[Any], Any] | None = None,
) -> tuple[OctreeNCA, int, float]:
    """(EMA model, iterations done, training seconds); ``cfg`` may be a model to fine-tune."""
    deadline = time.monotonic() + max_minutes * 60 if max_minutes else None
    cancel = (lambda: time.monotonic() > deadline) if deadline is not None else None
    try:
        res = train(
            cfg,
            pairs,
            tcfg,
            callback=callback,
            cancel=cancel,
            checkpoint=checkpoint,
            resume=checkpoint if resume else None,
        )
        return res.model, res.iterations, res.seconds
    except Cancelled:
        ck = load_checkpoint(checkpoint)
        done = int(ck["iteration"])
        seconds = float(ck["meta"]["seconds"])
        base = cfg.config if isinstance(cfg, OctreeNCA) else cfg
        prov = dict(base.provenance)
        prov.update(
            {
                "train": dict(tcfg.to_dict(), iterations=done),
                "iterations": done,
                "train_seconds": round(seconds, 1),
                "stopped_by_time_budget": True,
            }
        )
        model = OctreeNCA(base.replace(provenance=prov))
        model.load_state_dict(ck["ema"].state_dict())
        print(f"time budget reached: stopped after {done} iterations", flush=True)
        return model.eval(), done, seconds
