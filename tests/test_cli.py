"""The octreenca command line: train -> info -> segment, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_octreenca import load_model
from napari_octreenca.cli import main


def test_train_info_segment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    lab = np.zeros((48, 64), np.uint8)
    lab[10:30, 20:44] = 1
    img = np.stack([lab * 150 + 50, lab * 30 + 90, 200 - lab * 100], -1).astype(np.uint8)
    img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", img, photometric="rgb")
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    out = tmp_path / "m.safetensors"
    rc = main(
        [
            "train",
            "--pair",
            str(tmp_path / "img.tif"),
            str(tmp_path / "lab.tif"),
            "--preset",
            "pathology",
            "--steps",
            "4,4,8",
            "--iterations",
            "4",
            "--batch-size",
            "2",
            "--crop",
            "32,32",
            "--name",
            "toy",
            "--checkpoint",
            str(tmp_path / "ck.safetensors"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and out.exists() and (tmp_path / "ck.safetensors").exists()
    model = load_model(out)
    assert model.config.name == "toy" and model.config.steps == (4, 4, 8)
    assert model.config.provenance["iterations"] == 4 and "train_dice" in model.config.provenance
    # the training images' raw range, for the range warning when segmenting
    assert model.config.input_range == (float(img.min()), float(img.max())) and model.config.input_dtype == "uint8"
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "toy" in capsys.readouterr().out
    assert main(["segment", str(tmp_path / "img.tif"), str(tmp_path / "seg.tif"), "--model", str(out), "--quiet"]) == 0
    seg = tifffile.imread(tmp_path / "seg.tif")
    assert seg.shape == (48, 64)


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("octreenca: error:") and "\n" not in err and "bundled models" in err
    assert (
        main(["segment", str(tmp_path / "missing.tif"), str(tmp_path / "o.tif"), "--model", "he_epidermis", "--quiet"])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_every_option_says_what_it_does() -> None:
    """`octreenca CMD --help` explains every argument of every subcommand."""
    import argparse

    from napari_octreenca.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = {
        name: [a.option_strings or [a.dest] for a in sub._actions if a.help is None]
        for name, sub in subparsers.choices.items()
    }
    assert set(missing) >= {"segment", "train", "info", "import", "bench", "demo"}
    assert not any(missing.values()), missing
