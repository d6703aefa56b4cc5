"""Make docs/screenshot.png: the plugin in a real napari window with a segmented sample and the
NCA inspector open.

Run under an X server (headless: ``xvfb-run -a python scripts/screenshot.py``). It opens the H&E
skin sample (File > Open Sample), segments it with the bundled ``he_epidermis`` model through the
Segment widget, records the run with the NCA inspector, and saves the whole window.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _wait(app, job, timeout: float) -> None:
    t0 = time.monotonic()
    while job.running:
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{job.what} did not finish in {timeout} s")
    for _ in range(20):
        app.processEvents()
    if job.error is not None:
        raise RuntimeError(f"{job.what} failed: {job.error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(REPO / "docs" / "screenshot.png"))
    parser.add_argument("--model", default="he_epidermis", help="bundled model name or model file")
    parser.add_argument("--size", default="1600x1000", help="window size WxH")
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_octreenca.widgets._models import CATALOG
    from napari_octreenca.widgets.inspector_widget import InspectorWidget
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    model = args.model
    if model not in CATALOG.names():
        model = CATALOG.add(model)
    viewer = napari.Viewer(title="napari-octreenca")
    w, h = (int(v) for v in args.size.split("x"))
    viewer.window._qt_window.resize(w, h)
    viewer.open_sample("napari-octreenca", "he_skin")
    app = QApplication.instance()
    skin = viewer.layers["H&E skin"]

    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="OctreeNCA segment", area="right")
    seg.image.value = skin
    seg.model.value = model
    seg.runs.value = 1
    _wait(app, seg.start(), 900)

    insp = InspectorWidget(viewer)
    viewer.window.add_dock_widget(insp, name="NCA inspector", area="right", tabify=False)
    insp.image.value = skin
    insp.model.value = model
    _wait(app, insp.start(), 900)

    # What the picture shows: the section, the epidermis found, and the automaton's hidden state
    # (PCA colours) half-way through the finest level's steps.
    labels = viewer.layers["H&E skin labels"]
    labels.contour = 3
    labels.opacity = 0.9
    rgb = viewer.layers["H&E skin NCA evolution hidden RGB"]
    rgb.opacity = 0.4
    for name in ("epidermis (reference)",):
        if name in viewer.layers:
            viewer.layers[name].visible = False
    viewer.layers.move(viewer.layers.index(labels), len(viewer.layers) - 1)
    viewer.layers.selection.active = rgb
    step_axis = viewer.dims.ndim - 3
    levels = rgb.metadata["octreenca"]["step_levels"]
    finest = [i for i, lv in enumerate(levels) if lv == 0]
    viewer.dims.set_point(step_axis, finest[len(finest) // 2] if finest else len(levels) - 1)
    viewer.reset_view()
    for _ in range(30):
        app.processEvents()
        time.sleep(0.02)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    # 256 colours without dithering: a third of the bytes, no visible difference for a GUI shot.
    from PIL import Image

    img = Image.open(out).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"saved {out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
