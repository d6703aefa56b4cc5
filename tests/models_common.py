"""Checks shared by the bundled-model tests (file size, architecture, card facts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from napari_octreenca.nca.config import preset
from napari_octreenca.nca.modelfile import load_model, read_config, read_extra
from napari_octreenca.resources import bundled_models

CARD_KEYS = (
    "task",
    "training_data",
    "held_out_data",
    "preprocessing",
    "held_out_metrics",
    "baseline",
    "seed",
    "train_command",
    "train_wall_seconds",
    "metrics",
    "not_for_clinical_use",
)


def bundled(name: str) -> Path:
    models = bundled_models()
    assert name in models, f"bundled model {name} is missing from models ({sorted(models)})"
    return models[name]


def check_file_and_card(name: str, preset_name: str) -> tuple[Any, dict[str, Any]]:
    """The model file is small, loads, keeps the preset's architecture and carries its card."""
    path = bundled(name)
    assert path.stat().st_size < 1_000_000
    cfg = read_config(path)
    base = preset(preset_name)
    # Derived input channels (e.g. davis_video's motion) take the place of hidden ones.
    assert (cfg.channels, cfg.hidden, cfg.levels, cfg.factors, cfg.image_channels) == (
        base.channels,
        base.hidden,
        base.levels,
        base.factors,
        base.input_channels,
    )
    assert cfg.spacing is not None
    model = load_model(path)
    assert model.parameter_count() == cfg.parameter_count()
    extra = read_extra(path)
    missing = [k for k in CARD_KEYS if k not in extra]
    assert not missing, f"card facts missing from the model file: {missing}"
    assert extra["not_for_clinical_use"] is True
    card = path.with_suffix(".md")
    assert card.exists(), f"model card {card} is missing"
    text = card.read_text()
    assert "Not for clinical use" in text
    for value in extra["metrics"].values():
        assert f"{value:.3f}" in text, f"the card does not state the figure {value:.3f} stored in the model"
    return model, extra


def close_to_card(measured: float, card: float, tol: float = 0.01) -> None:
    if abs(measured - card) > tol:
        pytest.fail(f"held-out score {measured:.4f} differs from the card's {card:.4f} by more than {tol}")
