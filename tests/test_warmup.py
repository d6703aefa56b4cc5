"""The engine warm-up: a tiny run that loads the kernels once per process, ahead of the first
real run (the napari docks start it when they open)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_octreenca.run import warmup


@pytest.fixture(autouse=True)
def no_background_warm_up():
    """A dock opened by an earlier test may still be warming up in the background: let it finish
    before these tests swap the module's state."""
    for t in threading.enumerate():
        if t.name.startswith("octreenca-warm-up"):
            t.join(timeout=600)


def _count_calls(monkeypatch, module, name: str) -> list[int]:
    """Replace ``module.name`` by a wrapper that records each call; returns the record."""
    calls: list[int] = []
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def test_warm_up_runs_once_and_is_thread_safe(monkeypatch):
    monkeypatch.setattr(warmup, "_done", {})
    calls = _count_calls(monkeypatch, warmup, "segment")
    results: list[float] = []
    threads = [threading.Thread(target=lambda: results.append(warmup.warm_up("cpu"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]  # one tiny segmentation, whoever asked first
    assert sorted(results)[:2] == [0.0, 0.0] and max(results) > 0
    assert warmup.warmed_up("cpu") and not warmup.warmed_up("cuda")
    assert warmup.warm_up("cpu") == 0.0


def test_warm_up_leaves_the_global_random_state_alone(monkeypatch):
    """The tiny model's random weights come from a forked generator: a user's seeded torch
    state is the same after the warm-up as before."""
    import torch

    monkeypatch.setattr(warmup, "_done", {})
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    warmup.warm_up("cpu")
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())


def test_training_warm_up_runs_once_and_keeps_the_random_state(monkeypatch):
    """One tiny training iteration, once; train() seeds torch's generator, the warm-up hands the
    user's state back unchanged."""
    import torch

    from napari_octreenca.run import training

    monkeypatch.setattr(warmup, "_done", {})
    calls = _count_calls(monkeypatch, training, "train")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert warmup.warm_up_training("cpu") > 0
    assert warmup.warm_up_training("cpu") == 0.0
    assert calls == [1]
    assert warmup.warmed_up("cpu", training=True) and not warmup.warmed_up("cpu")
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())
