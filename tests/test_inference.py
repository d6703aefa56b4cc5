"""Inference: determinism, ensembles, axes, callbacks, cancel and bad-input errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from helpers import random_model

from napari_octreenca import Cancelled, InputError, segment
from napari_octreenca.run.inference import StepInfo, labels_from_logits


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (75, 94, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return np.random.default_rng(1).normal(100, 30, (21, 34, 27)).astype(np.float32)


def test_seeded_2d_identical_twice(rgb: np.ndarray) -> None:
    m = random_model("pathology")
    a = segment(m, rgb, seed=5)
    b = segment(m, rgb, seed=5)
    assert a.logits.shape == (1, 75, 94) and a.labels.shape == (75, 94)
    np.testing.assert_array_equal(a.logits, b.logits)
    c = segment(m, rgb, seed=6)
    assert np.abs(a.logits - c.logits).max() > 1e-3  # fire rate 0.5: the seed matters


def test_seeded_3d_identical_twice(volume: np.ndarray) -> None:
    m = random_model("radiology", steps=(3, 3, 3, 3, 6))
    a = segment(m, volume, seed=11)
    b = segment(m, volume, seed=11)
    assert a.logits.shape == (1, 21, 34, 27)
    np.testing.assert_array_equal(a.logits, b.logits)
    assert np.abs(a.logits - segment(m, volume, seed=12).logits).max() > 1e-3


def test_fire_rate_one_is_seed_independent(rgb: np.ndarray) -> None:
    m = random_model("pathology")
    a = segment(m, rgb, seed=1, fire_rate=1.0)
    b = segment(m, rgb, seed=2, fire_rate=1.0)
    np.testing.assert_array_equal(a.logits, b.logits)


def test_ensemble_median_and_spread(rgb: np.ndarray) -> None:
    m = random_model("pathology")
    singles = np.stack([segment(m, rgb, seed=s).logits for s in (3, 4, 5)])
    ens = segment(m, rgb, seed=3, runs=3)
    np.testing.assert_allclose(ens.logits, np.median(singles, axis=0), rtol=1e-6, atol=1e-6)
    assert ens.spread is not None and ens.spread.shape == ens.logits.shape
    probs = 1 / (1 + np.exp(-singles))
    np.testing.assert_allclose(ens.spread, probs.std(axis=0, ddof=1), rtol=1e-4, atol=1e-6)
    assert ens.seeds == [3, 4, 5]
    even = segment(m, rgb, seed=3, runs=4)
    singles4 = np.stack([segment(m, rgb, seed=s).logits for s in (3, 4, 5, 6)])
    np.testing.assert_allclose(even.logits, np.median(singles4, axis=0), rtol=1e-6, atol=1e-6)


def test_axes_channel_first_and_video(rgb: np.ndarray) -> None:
    m = random_model("pathology")
    a = segment(m, rgb, seed=0)
    b = segment(m, np.moveaxis(rgb, -1, 0), axes="CYX", seed=0)
    np.testing.assert_array_equal(a.logits, b.logits)
    video = np.random.default_rng(2).integers(0, 256, (9, 20, 24, 3), dtype=np.uint8)  # T, H, W, C
    mv = random_model("surgery", steps=(2, 2, 2, 2, 4))
    res = segment(mv, video, seed=0)
    assert res.axes == "TYX" and res.labels.shape == (9, 20, 24) and res.logits.shape == (5, 9, 20, 24)
    # Same as feeding the (H, W, T) volume the network sees.
    res2 = segment(mv, np.transpose(video, (1, 2, 0, 3)), axes="YXTC", seed=0)
    np.testing.assert_array_equal(res2.logits, np.transpose(res.logits, (0, 2, 3, 1)))


def test_torch_and_dask_inputs(rgb: np.ndarray) -> None:
    import dask.array as da

    m = random_model("pathology")
    a = segment(m, rgb, seed=0)
    np.testing.assert_array_equal(a.logits, segment(m, torch.from_numpy(rgb), seed=0).logits)
    np.testing.assert_array_equal(a.logits, segment(m, da.from_array(rgb, chunks=(32, 32, 3)), seed=0).logits)


def test_bfloat16_close_to_float32(rgb: np.ndarray) -> None:
    m = random_model("pathology", std=0.1)
    a = segment(m, rgb, seed=0, fire_rate=1.0)
    b = segment(m, rgb, seed=0, fire_rate=1.0, dtype="bfloat16")
    assert b.record["dtype"] == "bfloat16"
    scale = np.abs(a.logits).max()
    assert np.abs(a.logits - b.logits).max() < 0.1 * scale


def test_callback_sees_every_step_and_cancel_stops_within_one(rgb: np.ndarray) -> None:
    m = random_model("pathology")
    seen: list[StepInfo] = []
    segment(m, rgb, callback=seen.append)
    assert len(seen) == 60 and seen[-1].done == seen[-1].total == 60
    assert [s.level for s in seen[:20]] == [4] * 20 and seen[-1].level == 0
    assert seen[0].state.shape == (1, 13, 5, 6)  # logits + hidden at the coarsest level

    cancel = threading.Event()
    count = []

    def cb(info: StepInfo) -> None:
        count.append(info.done)
        if info.done == 23:
            cancel.set()

    with pytest.raises(Cancelled):
        segment(m, rgb, callback=cb, cancel=cancel)
    assert count[-1] == 23  # no further step ran after the request


@pytest.mark.parametrize(
    "image,axes,match",
    [
        (np.zeros((10, 10, 10, 3, 2)), None, "axes"),
        (np.zeros((10, 10, 4)), "YXC", "4 channels but the model expects 3"),
        (np.zeros((10, 10)), None, "no channel axis"),
        (np.zeros((0, 10, 3)), None, "empty"),
        (np.full((10, 10, 3), np.nan), None, "NaN"),
        (np.full((10, 10, 3), np.inf), None, "NaN or infinite"),
        (np.zeros((10, 10, 3)), "YXZ", "do not fit"),
        (np.array([["a"]]), None, "dtype"),
    ],
)
def test_bad_inputs(image: np.ndarray, axes: str | None, match: str) -> None:
    with pytest.raises(InputError, match=match):
        segment(random_model("pathology"), image, axes=axes)


def test_labels_from_logits() -> None:
    lg = np.array([[[-1.0, 2.0, 0.5]], [[-2.0, 1.0, 3.0]]])
    assert labels_from_logits(lg).tolist() == [[0, 1, 2]]
