"""napari plugin figures: cancel latency, GUI responsiveness during a run, inspector recording size.

Run under an X server: ``xvfb-run -a python benchmarks/bench_plugin.py``. Uses a random-weight
2D model with many steps (the figures concern the GUI plumbing, not segmentation quality).

- cancel latency: wall time from pressing Cancel to the worker having finished and the buttons
  back, against the time of one NCA step on the same image;
- GUI responsiveness: the longest gap between ticks of a 10 ms Qt timer on the GUI thread while
  a segmentation runs in the worker (a frozen GUI would show gaps as long as the run);
- recording size: the inspector's planned memory for a 40000 x 30000 slide under its default budget;
- inspector live mode (``--inspector``): the bundled ``he_epidermis`` model recorded on a crop of
  the real H&E sample, live and not live, alternated (N, L, L, N); per run the wall time and
  the longest gap of a 10 ms Qt timer while the run goes on. Reports the live/non-live time
  ratio (target <= 1.3) and the longest GUI stall in live mode (target < 100 ms).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


class GapTimer:
    """A Qt timer on the GUI thread (10 ms) that records, per tick, its time and the gap since the
    previous tick: a GUI thread blocked for 0.2 s shows as a 0.2 s gap."""

    def __init__(self, interval_ms: int = 10) -> None:
        from qtpy.QtCore import QTimer

        self.ticks: list[tuple[float, float]] = []
        self._last = time.monotonic()
        self._timer = QTimer()
        self._timer.timeout.connect(self._tick)
        self._timer.start(interval_ms)

    def _tick(self) -> None:
        now = time.monotonic()
        self.ticks.append((now, now - self._last))
        self._last = now

    def reset(self) -> None:
        """Forget the ticks so far; the next gap counts from now."""
        self.ticks.clear()
        self._last = time.monotonic()

    @property
    def longest(self) -> float:
        return max((g for _, g in self.ticks), default=float("nan"))

    def stop(self) -> None:
        self._timer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inspector", action="store_true", help="also measure the inspector's live mode")
    parser.add_argument("--only-inspector", action="store_true", help="measure the inspector's live mode only")
    parser.add_argument("--crop", type=int, default=192, help="edge of the H&E crop the inspector records")
    parser.add_argument(
        "--order",
        default="NLLNNL",
        help="the inspector runs in turn, N not live, L live (LNNLLN: a session's first run is live)",
    )
    parser.add_argument(
        "--napari-floor",
        action="store_true",
        help="after the inspector runs, time napari adding the same kinds of layer by itself",
    )
    args = parser.parse_args()
    if args.only_inspector:
        bench_inspector(args.crop, args.order, args.napari_floor)
        return

    import napari
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
    timer = GapTimer()
    latencies = []
    for _ in range(args.repeats):
        job = w.start()
        t_run = time.perf_counter()
        while time.perf_counter() - t_run < 2.0:  # let it step for 2 s
            app.processEvents()
            time.sleep(0.005)
        timer.reset()
        t_cancel = time.perf_counter()
        w.request_cancel()
        while job.running or not w.run_button.enabled:
            app.processEvents()
            time.sleep(0.001)
        latencies.append(time.perf_counter() - t_cancel)
        steps_done.append(job.cancelled)
    # Responsiveness during a run.
    job = w.start()
    timer.reset()
    t_run = time.perf_counter()
    while time.perf_counter() - t_run < 5.0:
        app.processEvents()
        time.sleep(0.002)
    worst_gap = timer.longest
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
    print(
        f"cancel latency over {args.repeats} runs: median {statistics.median(latencies) * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms; all cancelled: {all(steps_done)}"
    )
    print(f"GUI: longest gap between 10 ms timer ticks during a 5 s run: {worst_gap * 1000:.0f} ms")
    print(
        f"inspector recording plan for a 40000x30000 slide (budget {DEFAULT_BUDGET / 2**20:.0f} MB): "
        f"{mem['total'] / 2**20:.0f} MB; {plan.describe()}"
    )
    if args.inspector:
        bench_inspector(args.crop, args.order, args.napari_floor)


def bench_inspector(crop: int, order: str = "NLLNNL", napari_floor: bool = False) -> None:
    """Inspector: live vs non-live wall time and the longest GUI stall, on real data."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_octreenca.data_sources import skin_sample
    from napari_octreenca.widgets.inspector_widget import InspectorWidget

    img, _ = skin_sample()
    image = np.ascontiguousarray(img[200 : 200 + crop, 300 : 300 + crop])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1366, 768)
    viewer.add_image(image, rgb=True, name="he")
    w = InspectorWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.model.value = "he_epidermis"
    app = QApplication.instance()
    # A user opens the dock, then picks an image and a model: the engine's warm-up (started by
    # the dock) has finished by the first Run, as it has here.
    from napari_octreenca.widgets._workers import warm_up_in_background
    from napari_octreenca.widgets.shared import WARM_UP_LAYER

    warming = warm_up_in_background()  # the thread the dock started
    deadline = time.monotonic() + 30
    settle = time.monotonic() + 1.0  # and the dock's layer warm-up (a few timer turns)

    def warm_layers() -> bool:
        return any(WARM_UP_LAYER in ly.metadata for ly in viewer.layers)

    while (warming.is_alive() or warm_layers() or time.monotonic() < settle) and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.01)
    results: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    if set(order) - set("NL") or not {"N", "L"} <= set(order):
        raise SystemExit(f"--order takes N and L, both at least once; got {order!r}")
    timer = GapTimer()
    for live in [c == "L" for c in order]:
        w.live.value = live
        draws0 = w.plot.draws
        app.processEvents()
        timer.reset()
        t0 = time.perf_counter()
        cpu0 = time.thread_time()
        job = w.start()  # adds the (empty) live layer before the run starts
        click_s = time.perf_counter() - t0
        while job.running:
            app.processEvents()
            time.sleep(0.002)
        app.processEvents()
        qtimer_tick_after = time.monotonic() + 0.05
        while time.monotonic() < qtimer_tick_after:  # the tick that ends the gap of adding layers
            app.processEvents()
            time.sleep(0.002)
        gui_cpu = time.thread_time() - cpu0  # the GUI thread's CPU time over the run and the results
        returned = job.returned_at or time.monotonic()
        seconds = returned - job.started
        gaps = list(timer.ticks)  # (tick time, gap before it)
        # Gaps that ended before the engine returned belong to the run; the one spanning the
        # return is adding the result layers (once, live or not).
        # The first tick after the click ends the gap of the click itself, its repaint included.
        click_gap = gaps[0][1] if gaps else float("nan")
        during = [g for t, g in gaps[1:] if t <= returned]
        after = [g for t, g in gaps[1:] if t > returned]
        worst = max(during) if during else float("nan")
        results[live].append((seconds, worst, click_gap))
        print(
            f"inspector {'live    ' if live else 'not live'}: run {seconds:.1f} s, longest GUI gap during the "
            f"run {worst * 1000:.0f} ms ({len(during)} ticks), plot refreshes {w.plot.draws - draws0}; "
            f"Run button {click_s * 1000:.0f} ms (GUI gap with its repaint {click_gap * 1000:.0f} ms); adding the result layers: longest gap "
            f"{(max(after) if after else 0) * 1000:.0f} ms; GUI thread CPU {gui_cpu:.1f} s",
            flush=True,
        )
        app.processEvents()
    timer.stop()
    steps, interval = w.steps.value, w.interval.value
    if napari_floor:
        _napari_floor(viewer, app, image, steps)
    viewer.close()
    mean = {k: statistics.mean(r[0] for r in v) for k, v in results.items()}
    worst = max(r[1] for r in results[True])
    click = max(r[2] for r in results[True])
    print(
        f"inspector on a {crop}x{crop} H&E crop, he_epidermis, steps {steps}, live interval "
        f"{interval} ms: live/non-live time ratio {mean[True] / mean[False]:.2f} "
        f"({mean[True]:.1f} s / {mean[False]:.1f} s); longest GUI gap during a live run {worst * 1000:.0f} ms, "
        f"at a live run's Run button {click * 1000:.0f} ms"
    )


def _napari_floor(viewer: Any, app: Any, image: np.ndarray, steps: Any) -> None:
    """The GUI gap of napari adding, by itself, the kinds of layer a first inspector run adds (in
    the same viewer, its docks open, the run's layers removed): the floor under the plugin's
    figures. Each is added, painted and removed three times; the 4D one brings the level and
    step axes each time, as a session's first run does."""

    from napari_octreenca.widgets.shared import remove_layers

    remove_layers(viewer, [ly for ly in viewer.layers if ly.name != "he"])
    levels = len(str(steps).split(","))
    frame = np.zeros_like(image)
    kinds = {
        "4D RGB Image (level and step axes: new sliders)": lambda: viewer.add_image(
            np.broadcast_to(frame, (levels, 47) + frame.shape), rgb=True, name="floor"
        ),
        "2D Image": lambda: viewer.add_image(np.zeros(image.shape[:2], np.float32), name="floor"),
        "2D Labels": lambda: viewer.add_labels(np.zeros(image.shape[:2], np.uint8), name="floor"),
    }

    def pump(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.002)

    timer = GapTimer()
    for label, add in kinds.items():
        worst = []
        for _ in range(3):
            pump(0.3)
            timer.reset()
            layer = add()
            pump(0.3)
            worst.append(timer.longest)
            remove_layers(viewer, [layer])
        print(f"napari alone, adding a {label}: longest GUI gap {', '.join(f'{g * 1000:.0f}' for g in worst)} ms")
    timer.stop()


if __name__ == "__main__":
    main()
