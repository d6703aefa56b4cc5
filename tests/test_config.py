"""Presets, parameter counts, octree geometry and config validation."""

from __future__ import annotations

import pytest

from napari_octreenca import OctreeNCA
from napari_octreenca.cli import main
from napari_octreenca.nca.config import ModelConfig, preset
from napari_octreenca.nca.errors import ConfigError


@pytest.mark.parametrize("name,count", [("pathology", 15_520), ("radiology", 17_600), ("surgery", 16_960)])
def test_preset_parameter_counts(name: str, count: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert OctreeNCA(preset(name)).parameter_count() == count
    assert preset(name).parameter_count() == count
    assert main(["info", name]) == 0
    assert f"parameters:   {count:,}" in capsys.readouterr().out


def test_level_shapes_any_size() -> None:
    cfg = preset("radiology")
    shapes = cfg.level_shapes((181, 217, 33))
    assert shapes[0] == (181, 217, 33)
    assert shapes[1] == (91, 109, 17)
    assert shapes[2] == (46, 55, 9)
    assert shapes[3] == (23, 28, 9)  # (2, 2, 1): the short axis is kept
    assert shapes[4] == (12, 14, 9)


def test_steps_scale_with_size() -> None:
    cfg = preset("pathology", train_size=(320, 320))
    assert cfg.steps_for((320, 320)) == [10, 10, 10, 10, 20]
    assert cfg.steps_for((200, 100)) == [10, 10, 10, 10, 20]
    assert cfg.steps_for((1280, 640)) == [10, 10, 10, 10, 80]
    assert preset("pathology", scale_coarsest_steps=False, train_size=(320, 320)).steps_for((1280, 1280))[-1] == 20


def test_config_json_round_trip() -> None:
    cfg = preset("surgery", train_size=(64, 64, 16), provenance={"data": "x"})
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize(
    "changes,msg",
    [
        ({"fire_rate": 0.0}, "fire_rate"),
        ({"channels": 3}, "channels"),
        ({"steps": (10, 10)}, "factors"),
        ({"resize": "bicubic"}, "resize"),
        ({"class_names": ("a", "b")}, "class_names"),
    ],
)
def test_config_validation(changes: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        preset("pathology", **changes)


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("cardiology")


def test_new_model_leaves_the_global_random_state_alone() -> None:
    import torch

    from napari_octreenca import new_model

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = new_model("pathology", seed=1)
    assert torch.equal(torch.rand(3), expected)
    b = new_model("pathology", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
