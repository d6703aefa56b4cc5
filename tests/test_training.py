"""Training on real data: loss falls, Dice rises; checkpoints resume exactly; cancel; divergence."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_octreenca import Cancelled, load_model, preset, save_model, segment
from napari_octreenca.run.training import (
    TrainConfig,
    TrainingError,
    TrainPair,
    TrainProgress,
    dice_bce_loss,
    evaluate,
    hard_dice,
    train,
)


def _cholec_pairs(root: Path, n: int = 10) -> list[TrainPair]:
    from skimage.io import imread
    from skimage.transform import resize

    base = root / "cholec80-instrument"
    frames = sorted((base / "frames").glob("*.png"))[: 2 * n : 2]
    if not frames:
        pytest.skip(f"no cholec80 frames under {base}")
    pairs = []
    for p in frames:
        im = imread(p)[..., :3]
        m = imread(base / "masks" / p.name.replace("_frame", "_mask"))
        m = m[..., 0] if m.ndim == 3 else m
        im = (resize(im, (72, 128), anti_aliasing=True) * 255).astype(np.uint8)
        m = (resize(m.astype(float), (72, 128)) > 0.5).astype(np.uint8)
        pairs.append(TrainPair(im, m, "YXC"))
    return pairs


def _small_cfg() -> object:
    return preset("pathology", steps=(8, 8, 8, 16), factors=((2, 2),) * 3)


def test_cpu_training_on_real_data_loss_falls_dice_rises(shared_data: Path, tmp_path: Path) -> None:
    """A small 2D model learns laparoscopic instrument masks (Cholec80) in well under a minute."""
    pairs = _cholec_pairs(shared_data)
    hist: list[TrainProgress] = []
    before = evaluate(__import__("napari_octreenca").OctreeNCA(_small_cfg()), pairs[:8])["mean"]
    res = train(
        _small_cfg(), pairs[:8], TrainConfig(iterations=200, batch_size=4, crop=(64, 64), seed=0), callback=hist.append
    )
    loss = np.array([h.loss for h in hist])
    dice = np.array([h.dice for h in hist])
    assert loss[-25:].mean() < 0.75 * loss[:25].mean()
    assert dice[-25:].mean() > dice[:25].mean() + 0.3
    # Whole frames (the training saw 64x64 crops): better than the untrained model, which
    # predicts background everywhere (Dice 0, or 1 on the one frame without instrument).
    after = evaluate(res.model, pairs[:8])["mean"]
    assert after > before + 0.05
    # Save -> load round trip of the trained model gives identical logits.
    path = save_model(res.model, tmp_path / "cholec.safetensors")
    again = load_model(path)
    img = pairs[9].image
    np.testing.assert_array_equal(segment(res.model, img, seed=1).logits, segment(again, img, seed=1).logits)
    assert again.config.provenance["iterations"] == 200


def _toy_pairs() -> list[TrainPair]:
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(3):
        lab = np.zeros((40, 48), np.uint8)
        y, x = rng.integers(5, 30, 2)
        lab[y : y + 10, x : x + 12] = 1
        img = np.stack([lab * 180 + 40, lab * 20 + 90, 200 - lab * 100], -1).astype(np.uint8)
        pairs.append(TrainPair(img, lab, "YXC"))
    return pairs


def test_checkpoint_resume_is_exact(tmp_path: Path) -> None:
    cfg = _small_cfg()
    tc = TrainConfig(iterations=6, batch_size=2, crop=(32, 32), seed=3, checkpoint_every=3)
    full = train(cfg, _toy_pairs(), tc)
    ck = tmp_path / "ck.safetensors"
    stop = threading.Event()

    def cb(p: TrainProgress) -> None:
        if p.iteration == 3:
            stop.set()

    with pytest.raises(Cancelled):
        train(cfg, _toy_pairs(), tc, checkpoint=ck, callback=cb, cancel=stop)
    resumed = train(cfg, _toy_pairs(), None, resume=ck)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert len(resumed.history) == 6


def test_divergence_is_reported() -> None:
    # A learning rate of 1e30 blows the weights up after one step: the loss turns NaN/inf.
    with pytest.raises(TrainingError, match="diverged"):
        train(_small_cfg(), _toy_pairs(), TrainConfig(iterations=5, batch_size=1, crop=(32, 32), lr=1e30))


def test_labels_must_match() -> None:
    from napari_octreenca import InputError

    p = _toy_pairs()[0]
    with pytest.raises(InputError, match="labels must be in 0..1"):
        train(_small_cfg(), [TrainPair(p.image, p.labels * 3, "YXC")], TrainConfig(iterations=1))
    with pytest.raises(InputError, match="spatial"):
        train(_small_cfg(), [TrainPair(p.image, p.labels[None], "YXC")], TrainConfig(iterations=1))


def test_3d_patch_training_on_real_mri(itk_brain: tuple[Path, Path]) -> None:
    """Random patches on the two finest levels: logits cover only the patch; gradients reach all levels."""
    import nibabel as nib

    img = np.asarray(nib.load(itk_brain[0]).dataobj, dtype=np.float32)[::2, ::2, ::2]
    lab = (np.asarray(nib.load(itk_brain[1]).dataobj) > 0).astype(np.uint8)[::2, ::2, ::2]
    cfg = preset("radiology", steps=(4, 4, 4, 4, 8), axes="XYZ")
    from napari_octreenca import OctreeNCA

    model = OctreeNCA(cfg)
    with torch.no_grad():
        for lvl in model.levels:
            lvl.fc1.weight.normal_(0, 0.05)
    x = torch.from_numpy(img)[None, None]
    x = (x - x.mean()) / x.std()
    logits, patch = model.forward_train(x, [1], patch_size=(24, 24, 16), generator=torch.Generator().manual_seed(0))
    assert tuple(logits.shape[2:]) == patch.size and all(s <= p + 1 for s, p in zip(patch.size, (24, 24, 16)))
    target = torch.from_numpy(lab)[None, None].float()[(slice(None), slice(None)) + patch.slices()]
    dice_bce_loss(logits, target).backward()
    for level in model.levels:
        assert level.fc0.weight.grad is not None and float(level.fc0.weight.grad.abs().sum()) > 0
    res = train(
        cfg,
        [TrainPair(img, lab, "XYZ")],
        TrainConfig(iterations=3, batch_size=1, crop=(48, 48, 24), level_patch=(24, 24, 16)),
    )
    assert np.isfinite(res.history[-1]["loss"])


def test_hard_dice() -> None:
    a = np.array([1, 1, 0, 0])
    assert hard_dice(a, a) == 1.0
    assert hard_dice(a, 1 - a) == 0.0
    assert hard_dice(np.zeros(3), np.zeros(3)) == 1.0
