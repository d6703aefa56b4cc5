"""Make the plugin's screenshots in a real napari window: a segmented sample, the NCA inspector.

Run under an X server of the screen size wanted, e.g.::

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot.py              # docs/screenshot.png
    xvfb-run -a -s "-screen 0 1366x768x24" python scripts/screenshot.py --docks \
        --size 1366x768 --out docs/docks-1366x768.png                                 # the three docks
    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot.py --gif docs/nca-evolution.gif

It opens the H&E skin sample (File > Open Sample), segments it with the bundled ``he_epidermis``
model through the Segment widget, records the run with the NCA inspector (``--docks`` also
docks the Train widget: all three on a laptop screen), and saves the whole window.
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
    parser.add_argument("--docks", action="store_true", help="dock Segment, inspector and Train together")
    parser.add_argument(
        "--gif", default=None, help="also write an animated GIF of the recorded NCA evolution (canvas only)"
    )
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_octreenca.widgets._models import CATALOG
    from napari_octreenca.widgets.inspector_widget import InspectorWidget
    from napari_octreenca.widgets.segment_widget import SegmentWidget
    from napari_octreenca.widgets.training_widget import TrainingWidget

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
    seg_dock = viewer.window.add_dock_widget(seg, name="OctreeNCA segment", area="right")
    seg.image.value = skin
    seg.model.value = model
    seg.runs.value = 1
    _wait(app, seg.start(), 900)

    insp = InspectorWidget(viewer)
    insp_dock = viewer.window.add_dock_widget(insp, name="NCA inspector", area="right", tabify=False)
    if args.docks:
        train = TrainingWidget(viewer)
        train_dock = viewer.window.add_dock_widget(train, name="Train", area="right", tabify=False)
        train.image.value = skin
        train.labels.value = viewer.layers["epidermis (reference)"]
        docks = [seg_dock, insp_dock, train_dock]
    insp.image.value = skin
    insp.model.value = model
    _wait(app, insp.start(), 900)

    # What the picture shows: the section, the epidermis found, and the automaton's hidden state
    # (PCA colours) half-way through the finest level's steps.
    labels = viewer.layers["H&E skin labels"]
    labels.contour = 3
    labels.opacity = 0.9
    rgb = viewer.layers["H&E skin NCA hidden RGB"]
    rgb.opacity = 0.4
    for name in ("epidermis (reference)",):
        if name in viewer.layers:
            viewer.layers[name].visible = False
    viewer.layers.move(viewer.layers.index(labels), len(viewer.layers) - 1)
    viewer.layers.selection.active = rgb
    # The level and step sliders: finest level, half-way through its steps.
    level_axis = viewer.dims.ndim - 4
    steps = rgb.metadata["octreenca"]["steps"]
    viewer.dims.set_point(level_axis, 0)
    viewer.dims.set_point(level_axis + 1, max(0, steps[0] // 2 - 1))
    viewer.reset_view()
    # Share the screen's height (napari gives the spare height to the first dock): each dock
    # scrolls what does not fit.
    for _ in range(10):
        app.processEvents()
    from qtpy.QtCore import Qt

    if args.docks:
        viewer.window._qt_window.resizeDocks(docks, [250, 300, 170], Qt.Orientation.Vertical)
    else:
        viewer.window._qt_window.resizeDocks([seg_dock, insp_dock], [300, h - 300], Qt.Orientation.Vertical)
    for _ in range(30):
        app.processEvents()
        time.sleep(0.02)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    if args.gif:
        _evolution_gif(viewer, app, rgb, level_axis, Path(args.gif))
    # 256 colours without dithering: a third of the bytes, no visible difference for a GUI shot.
    from PIL import Image

    img = Image.open(out).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"saved {out}")
    viewer.close()
    return 0


def _evolution_gif(viewer, app, rgb, level_axis: int, path: Path, width: int = 300) -> None:
    """The hidden state (PCA colours) level by level, coarsest first, a few steps of each: the
    canvas at each slider position, as an animated GIF."""
    import numpy as np
    from PIL import Image

    steps = rgb.metadata["octreenca"]["steps"]
    rgb.opacity = 1.0  # the hidden state itself, not blended with the section
    frames = []
    for level in range(len(steps) - 1, -1, -1):
        n = max(1, steps[level])
        for step in sorted({0, n // 2, n - 1}):
            viewer.dims.set_point(level_axis, level)
            viewer.dims.set_point(level_axis + 1, step)
            for _ in range(5):
                app.processEvents()
            shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3]
            img = Image.fromarray(shot)
            img = img.resize((width, int(img.height * width / img.width)), Image.Resampling.LANCZOS)
            frames.append(img.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE))
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=350, loop=0, optimize=True)
    print(f"saved {path} ({len(frames)} frames)")


if __name__ == "__main__":
    sys.exit(main())
