"""napari plugin figures: cancel latency, GUI responsiveness during a run, inspector recording size.

Run under an X server: ``xvfb-run -a python benchmarks/bench_plugin.py``. Uses a random-weight
2D model with many steps (the figures concern the GUI plumbing, not segmentation quality).

- cancel latency: wall time from pressing Cancel to the worker having finished and the buttons
  back, against the time of one NCA step on the same image;
- GUI responsiveness: the longest gap between ticks of a 10 ms Qt timer on the GUI thread while
  a segmentation runs in the worker (a frozen GUI would show gaps as long as the run);
- recording size: the inspector's planned memory for a 40000 x 30000 slide under its default budget.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_octreenca import OctreeNCA, preset, save_model, segment
    from napari_octreenca.run.recorder import DEFAULT_BUDGET, plan_recording
    from napari_octreenca.widgets._models import CATALOG
    from napari_octreenca.widgets.segment_widget import SegmentWidget

    model = OctreeNCA(preset("pathology", steps=(5000, 5000), factors=((2, 2),)))
    g = torch.Generator().manual_seed(0)
    for level in model.levels:
        level.fc1.weight.data = torch.randn(level.fc1.weight.shape, generator=g) * 0.05
    tmp = Path(tempfile.mkdtemp())
    name = CATALOG.add(save_model(model, tmp / "slow.safetensors"))
    rng = np.random.default_rng(0)
    image = (rng.random((args.size, args.size, 3)) * 255).astype(np.uint8)

    # One step's time on this image (same backend the widget uses).
    steps_done = []
    t0 = time.perf_counter()
    segment(model, image, steps=[20, 0])
    step_s = (time.perf_counter() - t0) / 20

    viewer = napari.Viewer(show=True)
    viewer.add_image(image, rgb=True, name="img")
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.model.value = name
    app = QApplication.instance()
    gaps: list[float] = []
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(10)
    latencies = []
    for _ in range(args.repeats):
        job = w.start()
        t_run = time.perf_counter()
        while time.perf_counter() - t_run < 2.0:  # let it step for 2 s
            app.processEvents()
            time.sleep(0.005)
        gaps.clear()
        last[0] = time.perf_counter()
        t_cancel = time.perf_counter()
        w.request_cancel()
        while job.running or not w.run_button.enabled:
            app.processEvents()
            time.sleep(0.001)
        latencies.append(time.perf_counter() - t_cancel)
        steps_done.append(job.cancelled)
    # Responsiveness during a run.
    job = w.start()
    gaps.clear()
    last[0] = time.perf_counter()
    t_run = time.perf_counter()
    while time.perf_counter() - t_run < 5.0:
        app.processEvents()
        time.sleep(0.002)
    worst_gap = max(gaps) if gaps else float("nan")
    w.request_cancel()
    while job.running:
        app.processEvents()
        time.sleep(0.005)
    timer.stop()
    viewer.close()

    plan = plan_recording(preset("pathology"), (40_000, 30_000))
    mem = plan.memory()
    print(f"image {args.size}x{args.size} RGB, torch threads {torch.get_num_threads()}")
    print(f"one NCA step (finest level): {step_s * 1000:.1f} ms")
    print(f"cancel latency over {args.repeats} runs: median {statistics.median(latencies) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms; all cancelled: {all(steps_done)}")
    print(f"GUI: longest gap between 10 ms timer ticks during a 5 s run: {worst_gap * 1000:.0f} ms")
    print(f"inspector recording plan for a 40000x30000 slide (budget {DEFAULT_BUDGET / 2**20:.0f} MB): "
          f"{mem['total'] / 2**20:.0f} MB; {plan.describe()}")


if __name__ == "__main__":
    main()
