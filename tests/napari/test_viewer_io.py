"""Saving from the viewer through the plugin's writers, and the plugin's menus.

Deselect with ``-m "not napari"`` where there is no X server.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.napari


def test_save_labels_from_the_viewer(viewer, tmp_path: Path, itk_brain):
    """Open the brain sample, save its mask as NIfTI through the plugin's writer: affine kept."""
    import nibabel as nib

    pytest.importorskip("napari_octreenca.io.writers")
    viewer.open_sample("napari-octreenca", "brain_mri")
    mask = viewer.layers["brain mask (reference)"]
    out = tmp_path / "mask.nii.gz"
    written = mask.save(str(out), plugin="napari-octreenca")
    assert Path(written[0]) == out and out.exists()
    src = nib.load(str(itk_brain[0]))
    got = nib.load(str(out))
    np.testing.assert_allclose(got.affine, src.affine)
    assert got.shape == src.shape
    np.testing.assert_array_equal(np.asarray(got.dataobj) > 0, np.asarray(nib.load(str(itk_brain[1])).dataobj) > 0)


def test_menu_has_the_widgets(viewer):
    """The widgets are in Layers > Segment as well as in the Plugins menu."""
    from napari._app_model import get_app_model

    app = get_app_model()
    items = app.menus.get_menu("napari/layers/segment")
    ids = {getattr(getattr(i, "command", None), "id", "") for i in items}
    assert {
        "napari-octreenca.segment_widget",
        "napari-octreenca.inspector_widget",
        "napari-octreenca.training_widget",
    } <= ids


def test_defaults_come_from_napari_plugin_settings(plugin_settings, npe2pm):
    """The manifest's ``configurations`` appear in napari's plugin settings; the widgets read them."""
    from napari.settings import get_plugin_settings
    from npe2 import PluginManifest

    from napari_octreenca.resources import PACKAGE_DIR
    from napari_octreenca.widgets._settings import plugin_setting

    if "napari-octreenca" not in npe2pm:
        npe2pm.register(PluginManifest.from_file(PACKAGE_DIR / "napari.yaml"))
    settings = get_plugin_settings("napari-octreenca")
    assert settings.defaults.runs == 1 and settings.defaults.precision == "float32"
    assert plugin_setting("runs", 7) == 1
    settings.defaults.runs = 3
    settings.defaults.record_budget_mb = 64
    assert plugin_setting("runs", 1) == 3
    assert plugin_setting("record_budget_mb", 256) == 64


def test_drag_and_drop_needs_no_reader_choice_after_first_use(viewer, itk_brain):
    """napari's own reader claims .nii.gz too, so napari asks which reader to use; opening one of
    the plugin's docks makes it the preferred reader for its patterns (a user's choice stays)."""
    from napari.errors import MultipleReaderError
    from napari.settings import get_settings

    from napari_octreenca.widgets.segment_widget import SegmentWidget

    settings = get_settings().plugins
    settings.extension2reader = {"*.tif": "napari"}  # the user chose napari's reader for .tif
    # plugin=None is what File > Open and drag and drop do (the API's default is napari's own
    # reader): without a preference napari must ask which reader to use.
    with pytest.raises(MultipleReaderError):
        viewer.open(str(itk_brain[0]), plugin=None)
    SegmentWidget(viewer)
    assert settings.extension2reader["*.nii.gz"] == "napari-octreenca"
    assert settings.extension2reader["*.tif"] == "napari"  # never overridden
    (layer,) = viewer.open(str(itk_brain[0]), plugin=None)
    assert layer.metadata["octreenca"]["axes"] == "ZYX"  # read by this plugin, no question asked
