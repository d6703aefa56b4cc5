"""Classical baselines run by name from the command line and the API, like a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_octreenca.cli import main
from napari_octreenca.nca.errors import InputError
from napari_octreenca.run.baselines import (
    BASELINE_MODELS,
    baseline_advice,
    model_baseline_advice,
    otsu_brain_mask,
    run_baseline,
)
from napari_octreenca.run.training import hard_dice


def test_otsu_brain_by_name_from_the_cli(tmp_path: Path, itk_brain: tuple[Path, Path], capsys) -> None:
    """`--model otsu-brain` writes the baseline's mask on the input's grid; its Dice is the card's 0.952."""
    import nibabel as nib

    from napari_octreenca.data_sources import load_nifti_zyx
    from napari_octreenca.io.writers import read_labels_metadata

    out = tmp_path / "brain.nii.gz"
    assert main(["segment", str(itk_brain[0]), str(out), "--model", "otsu-brain", "--quiet"]) == 0
    assert "octreenca: hint" not in capsys.readouterr().err  # the baseline itself gets no advice
    got = nib.load(out)
    ref = nib.load(itk_brain[0])
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.affine, ref.affine)
    truth = np.asarray(nib.load(itk_brain[1]).dataobj) > 0
    assert abs(hard_dice(np.asarray(got.dataobj) == 1, truth) - 0.952) < 0.005
    assert read_labels_metadata(out)["model"] == "otsu-brain"
    img, sp = load_nifti_zyx(itk_brain[0])  # the same as the function on the RAS+ volume
    assert abs(hard_dice(run_baseline("otsu-brain", img, "ZYX", sp), otsu_brain_mask(img, sp)) - 1.0) < 1e-9


def test_baseline_errors_are_one_line() -> None:
    with pytest.raises(InputError, match="unknown baseline 'otsu-x'"):
        run_baseline("otsu-x", np.zeros((4, 4, 4)), "ZYX")
    with pytest.raises(InputError, match="needs a 3D"):
        run_baseline("otsu-brain", np.zeros((4, 4, 3)), "YXC")
    with pytest.raises(InputError, match="needs an RGB"):
        run_baseline("otsu-epidermis", np.zeros((4, 4, 4)), "ZYX")


BRAIN_HINT = (
    "On 1 of 2 held-out scans the Otsu baseline did better (Dice 0.95 vs 0.92) (ITK subject, head scan): "
    "use --model otsu-brain"
)


def test_cli_hints_the_better_baseline(tmp_path: Path, itk_brain: tuple[Path, Path], capsys) -> None:
    """`octreenca segment --model brain_mri` prints one line naming the baseline that did better on
    a held-out scan (read from the model file), then segments with the model as asked."""
    out = tmp_path / "brain.nii.gz"
    assert main(["segment", str(itk_brain[0]), str(out), "--model", "brain_mri", "--runs", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("octreenca: hint")] == [f"octreenca: hint: {BRAIN_HINT}"]
    assert out.exists()
    assert main(["info", "brain_mri"]) == 0
    assert f"hint:         {BRAIN_HINT}" in capsys.readouterr().out


def test_bundled_models_baseline_advice() -> None:
    """brain_mri's file carries its held-out comparison (the card's figures): Otsu did better on the
    head scan, the model on the skull-stripped one; he_epidermis beats its baseline on both of its
    inputs, so it gets none; a baseline's name gets none."""
    advice = model_baseline_advice("brain_mri")
    assert advice is not None and advice.baseline == "otsu-brain" and advice.baseline in BASELINE_MODELS
    assert advice.inputs == (
        ("ITK subject, head scan", 0.9234, 0.9519),
        ("ITK subject, skull-stripped", 0.9736, 0.966),
    )
    assert not advice.everywhere
    assert advice.cli_hint() == BRAIN_HINT
    assert model_baseline_advice("he_epidermis") is None
    assert model_baseline_advice("otsu-brain") is None
    assert model_baseline_advice("no-such-model") is None


def _comparison(model_scores: list[float], baseline: str = "otsu-brain") -> dict:
    return {
        "baseline_comparison": {
            "baseline": baseline,
            "baseline_label": "the Otsu baseline",
            "metric": "Dice",
            "data": "held-out scans",
            "inputs": [{"input": f"case {k}", "model": m, "baseline": 0.9} for k, m in enumerate(model_scores)],
        }
    }


def test_baseline_advice_names_the_inputs_the_baseline_won(tmp_path: Path) -> None:
    """Data-driven: the advice follows the scores stored in a model file, not the model's name; a
    baseline better on some inputs only is advised for those, one better on none is not."""
    from napari_octreenca import OctreeNCA, preset, save_model

    model = OctreeNCA(preset("radiology").replace(name="brain_mri"))
    worse = save_model(model, tmp_path / "worse.safetensors", extra=_comparison([0.5, 0.8]))
    advice = model_baseline_advice(worse)
    assert advice is not None and advice.everywhere
    assert advice.sentence == "On held-out scans the Otsu baseline did better (Dice 0.90 vs 0.50)"
    mixed = save_model(model, tmp_path / "mixed.safetensors", extra=_comparison([0.95, 0.5, 0.92]))
    advice = model_baseline_advice(mixed)
    assert advice is not None and not advice.everywhere and advice.better == (("case 1", 0.5, 0.9),)
    assert advice.sentence == "On 1 of 3 held-out scans the Otsu baseline did better (Dice 0.90 vs 0.50)"
    assert advice.cli_hint().endswith("(Dice 0.90 vs 0.50) (case 1): use --model otsu-brain")
    better = save_model(model, tmp_path / "better.safetensors", extra=_comparison([0.95, 0.9]))
    assert model_baseline_advice(better) is None  # a tie is no reason to switch
    # A comparison with a baseline that cannot run by name cannot be offered as a switch.
    assert baseline_advice(_comparison([0.1], baseline="spatial-prior")) is None
    assert baseline_advice({}) is None


def test_model_card_writes_the_comparison_from_its_spec() -> None:
    """The bundled file's comparison is what scripts/model_card.py builds from card_baselines.json and
    the card's metrics: the tooling and the shipped file agree."""
    import importlib.util
    import json

    from napari_octreenca.nca.modelfile import read_extra
    from napari_octreenca.resources import bundled_models

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    spec = importlib.util.spec_from_file_location("model_card", scripts / "model_card.py")
    assert spec is not None and spec.loader is not None
    card = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(card)
    extra = read_extra(bundled_models()["brain_mri"])
    wanted = json.loads((scripts / "card_baselines.json").read_text())["brain_mri"]
    assert card.baseline_comparison(wanted, extra["metrics"]) == extra["baseline_comparison"]
    text = card.render("brain_mri", __import__("napari_octreenca").open_model("brain_mri").config, extra)
    assert f"`{BRAIN_HINT}`" in text
