"""Safe model files: round trip, clear errors for bad files, import of original checkpoints."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_model
from reference_original import OriginalOctreeNCA

from napari_octreenca import ModelFileError, import_original, load_model, save_model, segment
from napari_octreenca.cli import main
from napari_octreenca.nca.modelfile import read_config


def test_save_load_round_trip_identical_logits(tmp_path: Path) -> None:
    m = random_model("pathology", seed=3)
    path = save_model(m, tmp_path / "m.safetensors")
    m2 = load_model(path)
    assert m2.config == m.config
    img = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    np.testing.assert_array_equal(segment(m, img, seed=4).logits, segment(m2, img, seed=4).logits)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind


def test_file_is_not_pickle(tmp_path: Path) -> None:
    path = save_model(random_model("radiology"), tmp_path / "m.safetensors")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"]["format"] == "octreenca"
    assert json.loads(header["__metadata__"]["config"])["parameters"] == 17_600
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(raw)


def test_truncated_file(tmp_path: Path) -> None:
    path = save_model(random_model(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load_model(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelFileError, match="not a readable"):
        load_model(tmp_path / "junk.safetensors")


def _rewrite(path: Path, out: Path, meta_change: dict | None = None, tensor_change: dict | None = None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_change or {})
    tensors.update(tensor_change or {})
    save_file(tensors, str(out), metadata=meta)
    return out


def test_wrong_version_mismatch_and_nan(tmp_path: Path) -> None:
    path = save_model(random_model(), tmp_path / "m.safetensors")
    with pytest.raises(ModelFileError, match="format version '99'"):
        load_model(_rewrite(path, tmp_path / "v.safetensors", {"format_version": "99"}))
    with pytest.raises(ModelFileError, match="not an OctreeNCA model"):
        load_model(_rewrite(path, tmp_path / "f.safetensors", {"format": "other"}))
    with pytest.raises(ModelFileError, match="has shape"):
        load_model(_rewrite(path, tmp_path / "s.safetensors", tensor_change={"levels.0.fc0.bias": torch.zeros(7)}))
    bad = torch.zeros(13, 64, 1, 1)
    bad[0, 0] = float("nan")
    with pytest.raises(ModelFileError, match="not finite"):
        load_model(_rewrite(path, tmp_path / "n.safetensors", tensor_change={"levels.1.fc1.weight": bad}))
    with pytest.raises(ModelFileError, match="invalid model config"):
        load_model(_rewrite(path, tmp_path / "c.safetensors", {"config": json.dumps({"spatial_dims": 4})}))
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


def test_cli_reports_bad_model_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"nope")
    assert main(["info", str(tmp_path / "junk.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("octreenca: error:") and "\n" not in err


def _original(dims: int, levels: int, cin: int, cout: int, seed: int) -> OriginalOctreeNCA:
    torch.manual_seed(seed)
    orig = OriginalOctreeNCA(16, 64, cin, cout, dims, levels)
    with torch.no_grad():
        for p in orig.parameters():
            p.normal_(0, 0.1)
    return orig


@pytest.mark.parametrize("dims", [2, 3])
def test_import_original_matches_original_code(tmp_path: Path, dims: int) -> None:
    levels, cin = (4, 3) if dims == 2 else (3, 1)
    orig = _original(dims, levels, cin, 1, seed=dims)
    ckpt = tmp_path / "orig.pth"
    torch.save({"model": orig.state_dict()}, ckpt)
    steps = [3] * (levels - 1) + [6]
    preset = "pathology" if dims == 2 else "radiology"
    f = ((2,) * dims,) * (levels - 1)
    model = import_original(ckpt, preset, steps=tuple(steps), factors=f)
    assert model.config.resize == "nearest"
    shape = (64, 48) if dims == 2 else (16, 24, 8)
    x = torch.rand((1, cin) + shape)
    res = [shape]
    for _ in range(levels - 1):
        res.append(tuple(s // 2 for s in res[-1]))
    expected = orig(x, res, steps, fire_rate=1.0)
    from napari_octreenca.run.inference import run_octree

    got = run_octree(model, x, fire_rate=1.0, backend="torch")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Through the CLI too: import, then info.
    out = tmp_path / "converted.safetensors"
    args = ["import", str(ckpt), str(out), "--preset", preset, "--steps", ",".join(map(str, steps))]
    if dims == 2:
        assert main(args) == 0
        assert read_config(out).levels == levels


def test_import_refuses_pickled_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("owned",))

    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as fh:
        pickle.dump({"backbone_ncas.0.conv.weight": Evil()}, fh)
    with pytest.raises(ModelFileError, match="weights-only"):
        import_original(bad)


def test_loading_a_pth_as_model_says_import(tmp_path: Path) -> None:
    p = tmp_path / "x.pth"
    p.write_bytes(b"0")
    with pytest.raises(ModelFileError, match="octreenca import"):
        load_model(p)


def test_cli_normalization_names_match_the_library() -> None:
    from napari_octreenca.cli import ORIGINAL_NORMALIZATION_NAMES
    from napari_octreenca.nca.config import ORIGINAL_NORMALIZATIONS

    assert set(ORIGINAL_NORMALIZATION_NAMES) == set(ORIGINAL_NORMALIZATIONS)


def _original_labels(orig: OriginalOctreeNCA, rgb: np.ndarray, steps: list[int], levels: int) -> np.ndarray:
    """The published code's segmentation of an RGB uint8 image: its PESO input normalisation
    (/255, ImageNet mean/std), deterministic fire rate, logits > 0."""
    x = (rgb / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    t = torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32))
    res = [rgb.shape[:2]]
    for _ in range(levels - 1):
        res.append(tuple(s // 2 for s in res[-1]))
    logits = orig(t, res, steps, fire_rate=1.0)[0, 0].numpy()
    return logits


def test_imported_checkpoint_reproduces_original_segmentation_from_cli(tmp_path: Path) -> None:
    from skimage.io import imread, imsave

    levels = 4
    orig = _original(2, levels, 3, 1, seed=7)
    ckpt = tmp_path / "orig.pth"
    torch.save({"model": orig.state_dict()}, ckpt)
    rgb = np.random.default_rng(5).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    rgb[16:40, 8:30] //= 3  # a darker block so that both classes occur
    imsave(tmp_path / "img.png", rgb, check_contrast=False)
    steps = [3, 3, 3, 6]
    logits = _original_labels(orig, rgb, steps, levels)
    expected = (logits > 0).astype(np.uint8)
    sure = np.abs(logits) > 1e-4  # voxels whose sign a 1e-6 rounding difference cannot flip
    assert 0.05 < expected.mean() < 0.95

    conv = tmp_path / "converted.safetensors"
    assert (
        main(
            [
                "import",
                str(ckpt),
                str(conv),
                "--preset",
                "pathology",
                "--steps",
                "3,3,3,6",
                "--normalization",
                "imagenet",
                "--fire-rate",
                "1",
            ]
        )
        == 0
    )
    cfg = read_config(conv)
    assert cfg.fire_rate == 1.0 and cfg.normalization.mean == (0.485, 0.456, 0.406)
    assert main(["segment", str(tmp_path / "img.png"), str(tmp_path / "out.png"), "--model", str(conv), "--quiet"]) == 0
    got = imread(tmp_path / "out.png")
    np.testing.assert_array_equal(got[sure], expected[sure])

    # A checkpoint imported with the preset's settings gets them per run from `segment`.
    plain = tmp_path / "plain.safetensors"
    assert main(["import", str(ckpt), str(plain), "--preset", "pathology", "--steps", "3,3,3,6"]) == 0
    assert (
        main(
            [
                "segment",
                str(tmp_path / "img.png"),
                str(tmp_path / "out2.png"),
                "--model",
                str(plain),
                "--normalization",
                "imagenet",
                "--fire-rate",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(imread(tmp_path / "out2.png")[sure], expected[sure])
    # ... and without them the result differs: the flags matter.
    assert (
        main(["segment", str(tmp_path / "img.png"), str(tmp_path / "out3.png"), "--model", str(plain), "--quiet"]) == 0
    )
    assert (imread(tmp_path / "out3.png")[sure] != expected[sure]).any()


def test_unknown_normalization_is_one_line_error(tmp_path: Path) -> None:
    from napari_octreenca.nca.modelfile import original_normalization

    with pytest.raises(ModelFileError, match="unknown normalisation 'zz'"):
        original_normalization("zz")


def test_imported_3d_checkpoint_reproduces_original_on_a_nifti_from_cli(tmp_path: Path) -> None:
    """The published code reads NIfTI volumes with nibabel, (i, j, k) order, and maps the 0.5/99.5
    percentiles to 0/1; `import --normalization percentile` and the imported axes reproduce that."""
    import nibabel as nib

    levels = 3
    orig = _original(3, levels, 1, 1, seed=4)
    ckpt = tmp_path / "orig3d.pth"
    torch.save({"model": orig.state_dict()}, ckpt)
    rng = np.random.default_rng(1)
    vol = rng.gamma(2.0, 30.0, (32, 24, 16)).astype(np.float32)  # nibabel (i, j, k)
    vol[8:20, 6:18, 4:12] *= 3
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "vol.nii.gz")
    lo, hi = np.percentile(vol, [0.5, 99.5])
    x = torch.from_numpy(np.clip((vol - lo) / (hi - lo), 0, 1))[None, None]
    res = [vol.shape]
    for _ in range(levels - 1):
        res.append(tuple(s // 2 for s in res[-1]))
    logits = orig(x, res, [3, 3, 6], fire_rate=1.0)[0, 0].numpy()
    expected, sure = (logits > 0).astype(np.uint8), np.abs(logits) > 1e-4
    assert 0.05 < expected.mean() < 0.95
    conv = tmp_path / "conv3d.safetensors"
    assert (
        main(
            [
                "import",
                str(ckpt),
                str(conv),
                "--preset",
                "radiology",
                "--steps",
                "3,3,6",
                "--normalization",
                "percentile",
                "--fire-rate",
                "1",
            ]
        )
        == 0
    )
    assert read_config(conv).axes == "XYZ"
    assert (
        main(["segment", str(tmp_path / "vol.nii.gz"), str(tmp_path / "seg.nii.gz"), "--model", str(conv), "--quiet"])
        == 0
    )
    got = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
    np.testing.assert_array_equal(got[sure], expected[sure])
