"""The bundled video model: file, card, and J on a held-out DAVIS sequence (shared data)."""

from __future__ import annotations

import numpy as np
from models_common import check_file_and_card, close_to_card

from napari_octreenca.data_sources import davis_sequence
from napari_octreenca.run.baselines import baseline_advice
from napari_octreenca.run.resample import segment_at_model_spacing


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return 1.0 if u == 0 else float(np.logical_and(a, b).sum() / u)


def test_davis_model_file_and_card() -> None:
    model, extra = check_file_and_card("davis_video", "surgery")
    assert model.config.axes == "YXT" and model.config.output_channels == 1
    per_seq = extra["held_out_metrics"]["per_sequence"]
    assert len(per_seq) >= 3
    assert not set(per_seq) & set(extra["training_sequences"])  # whole sequences held out
    assert model.config.input_features == ("motion",) and model.config.image_channels == 3
    # Compared with the motion baseline per held-out sequence: the advice names the sequences on
    # which the baseline did better, not the one the model won.
    comp = extra["baseline_comparison"]
    assert comp["baseline"] == "motion-video" and len(comp["inputs"]) == len(per_seq)
    won = [c["input"] for c in comp["inputs"] if c["model"] > c["baseline"]]
    lost = [c["input"] for c in comp["inputs"] if c["model"] < c["baseline"]]
    advice = baseline_advice(extra)
    assert won and lost and advice is not None and not advice.everywhere
    assert advice.sentence.startswith(f"On {len(lost)} of {len(per_seq)} held-out DAVIS sequences the motion")
    assert f"({', '.join(lost)}): use --model motion-video" in advice.cli_hint()


def test_davis_held_out_J_matches_card(shared_data) -> None:
    """The card's short-clip figure (the first frames of the shortest held-out sequence, segmented on
    their own) keeps the test fast; the training script computes the whole-sequence figures."""
    model, extra = check_file_and_card("davis_video", "surgery")
    clip = extra["held_out_metrics"]["clip"]
    assert clip["sequence"] in extra["held_out_metrics"]["per_sequence"]
    frames, masks = davis_sequence(shared_data / "davis2016", clip["sequence"])
    frames, masks = frames[: clip["frames"]], masks[: clip["frames"]]
    res = segment_at_model_spacing(model, frames, (1.0, 1.0, 1.0), axes="TYXC")
    assert res.labels.shape == masks.shape
    pred = res.labels == 1
    close_to_card(float(np.mean([_iou(p, t) for p, t in zip(pred, masks > 0)])), clip["J"])
    stab = float(np.mean([_iou(pred[i], pred[i + 1]) for i in range(len(pred) - 1)]))
    close_to_card(stab, clip["consecutive_iou_pred"])


def test_davis_quality_reproduces_its_calibration(shared_data) -> None:
    """The calibrated estimate (spread and coverage floor, scripts/calibrate_quality.py) as the card
    stores it: a still clip (a frame repeated: nothing moves) gets a confident, almost empty result
    that only the coverage floor flags; a held-out sequence's first frames are not flagged."""
    from napari_octreenca.run.quality import model_calibration

    model, _ = check_file_and_card("davis_video", "surgery")
    cal = model_calibration(model.config)
    assert cal is not None and cal["min_fraction"] > 0 and "threshold" in cal
    for name, still, key in (
        ("cows", True, ("failing", "cows, first frame repeated (nothing moves)")),
        ("blackswan", False, ("test", "blackswan, first 40 frames (held out)")),
    ):
        frames = davis_sequence(shared_data / "davis2016", name)[0][:40]
        if still:
            frames = np.repeat(frames[:1], len(frames), 0)
        q = segment_at_model_spacing(model, frames, (1.0, 1.0, 1.0), axes="TYXC", runs=3, seed=0).quality
        stored = cal["calibrated_on"][key[0]][key[1]]
        assert abs(q["score"] - stored["score"]) < 1e-3
        assert q["flagged"] == bool(stored["flagged_by"]) == still, q["verdict"]
        if still:
            assert q["verdict"].startswith("almost nothing was segmented")
