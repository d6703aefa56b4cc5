"""The NCA inspector: watch the automaton work.

Runs a model on an Image layer while an :class:`~napari_octreenca.run.recorder.NCARecorder` keeps
every level's hidden channels, the step-by-step evolution (logits and a PCA colour view of the
hidden state, on the visible region or at reduced resolution so memory stays bounded) and the
convergence per level. The memory the recording takes is shown before the run. In live mode the
layers update while the NCA iterates (throttled; the plot appends line data, it never rebuilds).
The convergence view reads each level in plain words: whether its labels stopped changing, by
which step, against the steps the model was trained with; edit the steps per level and record
again to try more test-time steps. A new recording replaces the previous one's layers unless
"keep previous results" is ticked.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, LineEdit, ProgressBar, PushButton, SpinBox

from ..run.execute import execute
from ..run.planner import Grid, RunOptions, RunPlan, grid_axis_plan, grid_model_shape, plan_run
from ..run.recorder import (
    Frame,
    LevelReading,
    NCARecorder,
    RecordPlan,
    expected_update,
    level_reading,
    plan_recording,
    reading_window,
    recording_layers,
)
from ._devices import list_devices
from ._layers import layer_input, output_layers
from ._models import CATALOG, follow_catalog
from ._settings import plugin_setting
from ._workers import Job, Throttle, warm_up_in_background, warm_up_layers
from .qt_helpers import DockContainer, ElidedLabel, advanced_group, on_dock_closed
from .shared import config_of as _config_of
from .shared import free_prefix, image_layer_choices, place_layers, remove_layers, update_layer

if TYPE_CHECKING:
    import napari


def visible_region(layer: Any) -> list[tuple[int, int]] | None:
    """The part of ``layer`` (its spatial data axes) the canvas shows, or None if unknown."""
    corners = getattr(layer, "corner_pixels", None)
    if corners is None:
        return None
    corners = np.asarray(corners)
    if corners.ndim != 2 or corners.shape[0] != 2:
        return None
    n = len(layer.data.shape if not layer.multiscale else layer.data[0].shape) - (1 if layer.rgb else 0)
    if corners.shape[1] < n:
        return None
    # Multiscale layers report corners at the displayed level: scale them to level 0.
    f = np.asarray(layer.downsample_factors[layer.data_level])[:n] if layer.multiscale else np.ones(n)
    lo = np.floor(corners[0, :n] * f).astype(int)
    hi = np.ceil((corners[1, :n] + 1) * f).astype(int)
    return [(int(a), int(b)) for a, b in zip(lo, hi)]


#: Level colours (matplotlib's default cycle, so figures made from a recording match).
_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


class ConvergencePlot:
    """The convergence of every level on one time line (coarsest level first, the order the NCA
    runs them): the expected update per step (fire-rate adjusted, mean over a short window; log
    scale, solid, left axis) and the share of cells whose label changed (dotted, right axis),
    with the steps the model was trained with marked (dashed).

    Painted with QPainter in a few milliseconds (a matplotlib figure took 0.3-0.9 s per draw on
    the 2-core dev machine, a GUI freeze each time). :meth:`setup` starts a run's plot once;
    :meth:`append` adds data; :meth:`refresh` recomputes the curves and schedules a repaint at
    most every ``min_interval`` seconds."""

    def __init__(self, min_interval: float = 0.5) -> None:
        self.canvas = _PlotCanvas(self)
        self.min_interval = min_interval
        self.builds = 0  # plot set-ups: one per run
        self.draws = 0  # refreshes that scheduled a repaint
        self._last_draw = -math.inf
        self._dirty = False
        self.update: dict[int, list[float]] = {}
        self.changes: dict[int, list[float]] = {}
        self.curves: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # level -> x, update, changes
        self.offsets: dict[int, int] = {}
        self.steps: tuple[int, ...] = ()
        self.trained: tuple[int, ...] = ()
        self.fire_rate = 0.5
        self.y_range = (1e-4, 1.0)
        self.change_top = 0.01

    def curve(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, expected update) of ``level`` as drawn."""
        x, y, _ = self.curves.get(level, (np.zeros(0), np.zeros(0), np.zeros(0)))
        return x, y

    def setup(self, steps: tuple[int, ...], trained: tuple[int, ...], fire_rate: float) -> None:
        """An empty plot for a run with ``steps`` per level (finest first)."""
        self.builds += 1
        self.steps, self.trained, self.fire_rate = tuple(steps), tuple(trained), fire_rate
        self.update, self.changes, self.curves = {}, {}, {}
        x0 = 0
        self.offsets = {}
        for level in range(len(steps) - 1, -1, -1):
            self.offsets[level] = x0
            x0 += steps[level]
        self._dirty = True
        self.refresh(force=True)

    def append(self, update: dict[int, list[float]], changes: dict[int, list[float]]) -> None:
        """Add the values recorded since the last call (per level)."""
        for level, values in update.items():
            self.update.setdefault(level, []).extend(values)
        for level, values in changes.items():
            self.changes.setdefault(level, []).extend(values)
        self._dirty = self._dirty or bool(update)

    def show_all(self, update: dict[int, list[float]], changes: dict[int, list[float]]) -> None:
        """Replace the curves with a finished recording's and repaint now."""
        self.update = {k: list(v) for k, v in update.items()}
        self.changes = {k: list(v) for k, v in changes.items()}
        self._dirty = True
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> bool:
        """Recompute the curves and repaint if something changed and the last repaint is
        ``min_interval`` old (or ``force``)."""
        now = time.monotonic()
        if not self._dirty or (not force and now - self._last_draw < self.min_interval):
            return False
        lo, hi, top = math.inf, 0.0, 0.0
        for level in self.offsets:
            n = self.steps[level] if level < len(self.steps) else 1
            y = expected_update(self.update.get(level, []), self.fire_rate, reading_window(n))
            ch = np.asarray(self.changes.get(level, []), dtype=float)
            x = self.offsets[level] + np.arange(1, y.size + 1, dtype=float)
            self.curves[level] = (x, y, ch[: y.size])
            finite = y[np.isfinite(y) & (y > 0)]
            if finite.size:
                lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
            if np.isfinite(ch).any():
                top = max(top, float(np.nanmax(ch)))
        if math.isfinite(lo):
            self.y_range = (lo / 2, hi * 2)
        self.change_top = max(0.01, top * 1.1)
        self.canvas.update()  # a repaint when Qt next paints: never inside this call
        self.draws += 1
        self._last_draw = now
        self._dirty = False
        return True


def _plot_canvas_class() -> Any:
    """The QWidget class that paints a :class:`ConvergencePlot` (Qt imported on first use)."""
    from qtpy.QtCore import QPointF, QRectF, Qt
    from qtpy.QtGui import QColor, QFont, QPainter, QPen, QPolygonF
    from qtpy.QtWidgets import QSizePolicy, QWidget

    class PlotCanvas(QWidget):
        def __init__(self, plot: ConvergencePlot) -> None:
            super().__init__()
            self.plot = plot
            self.setMinimumHeight(130)
            self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
            self.setToolTip(
                "solid: expected update per step (log, left); dotted: cells whose label changed "
                "(right); dashed: the steps the model was trained with"
            )

        def sizeHint(self) -> Any:
            from qtpy.QtCore import QSize

            return QSize(320, 150)

        def paintEvent(self, event: Any) -> None:
            p = self.plot
            painter = QPainter(self)
            painter.setRenderHint(QPainter.RenderHint.Antialiasing)
            font = QFont(painter.font())
            font.setPointSizeF(7.0)
            painter.setFont(font)
            fg = self.palette().windowText().color()
            w, h = self.width(), self.height()
            box = QRectF(46, 14, max(10, w - 46 - 40), max(10, h - 14 - 20))
            painter.setPen(QPen(fg, 1))
            painter.drawRect(box)
            total = max(1, sum(p.steps))
            lo, hi = p.y_range
            llo, lhi = math.log10(lo), math.log10(hi)

            def px(x: float) -> float:
                return box.left() + (x - 0.5) / total * box.width()

            def py(y: float) -> float:
                return box.bottom() - (math.log10(y) - llo) / max(1e-9, lhi - llo) * box.height()

            def pc(c: float) -> float:
                return box.bottom() - c / p.change_top * box.height()

            for level, x0 in p.offsets.items():
                colour = QColor(_COLOURS[level % len(_COLOURS)])
                n = p.steps[level]
                painter.setPen(QPen(colour, 1))
                painter.drawText(
                    QRectF(px(x0 + 0.5), 0, max(1.0, px(x0 + n + 0.5) - px(x0 + 0.5)), 13),
                    int(Qt.AlignmentFlag.AlignCenter),
                    f"L{level}",
                )
                if x0 > 0:
                    painter.setPen(QPen(QColor(150, 150, 150), 1))
                    painter.drawLine(QPointF(px(x0 + 0.5), box.top()), QPointF(px(x0 + 0.5), box.bottom()))
                t = p.trained[level] if level < len(p.trained) else 0
                if 0 < t != n:
                    painter.setPen(QPen(colour, 1, Qt.PenStyle.DashLine))
                    painter.drawLine(QPointF(px(x0 + t + 0.5), box.top()), QPointF(px(x0 + t + 0.5), box.bottom()))
                x, y, ch = p.curves.get(level, (np.zeros(0), np.zeros(0), np.zeros(0)))
                pts = [QPointF(px(a), py(b)) for a, b in zip(x, y) if math.isfinite(b) and b > 0]
                painter.setPen(QPen(colour, 1.5))
                if len(pts) > 1:
                    painter.drawPolyline(QPolygonF(pts))
                elif pts:
                    painter.drawEllipse(pts[0], 1.5, 1.5)
                cpts = [QPointF(px(a), pc(c)) for a, c in zip(x, ch) if math.isfinite(c)]
                painter.setPen(QPen(colour, 1, Qt.PenStyle.DotLine))
                if len(cpts) > 1:
                    painter.drawPolyline(QPolygonF(cpts))
            painter.setPen(QPen(fg, 1))
            left = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
            right = Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter
            painter.drawText(QRectF(0, box.top() - 6, 43, 12), int(left), f"{hi:.0e}")
            painter.drawText(QRectF(0, box.bottom() - 6, 43, 12), int(left), f"{lo:.0e}")
            painter.drawText(QRectF(box.right() + 3, box.top() - 6, 40, 12), int(right), f"{p.change_top:.1%}")
            painter.drawText(QRectF(box.right() + 3, box.bottom() - 6, 40, 12), int(right), "0%")
            painter.drawText(
                QRectF(box.left(), box.bottom() + 2, box.width(), 14),
                int(Qt.AlignmentFlag.AlignCenter),
                f"step 1-{total}, coarsest level first",
            )
            painter.end()

    return PlotCanvas


def _PlotCanvas(plot: ConvergencePlot) -> Any:
    return _plot_canvas_class()(plot)


class InspectorWidget(DockContainer):
    """Record and show an OctreeNCA's hidden channels, evolution and convergence (dock widget)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=lambda _w: image_layer_choices(self.viewer))
        self.model = ComboBox(label="model", choices=lambda _w: CATALOG.names())
        self.device = ComboBox(label="device", choices=[(d.label, d.id) for d in list_devices()])
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.level = SpinBox(
            label="pyramid level",
            min=0,
            max=0,
            value=0,
            tooltip="multiscale inputs: the resolution level to run on (0 = finest)",
        )
        self.steps = LineEdit(
            label="steps per level", value="", tooltip="finest level first; raise them to try more test-time steps"
        )
        self.budget = SpinBox(
            label="memory budget (MB)", min=16, max=65536, value=int(plugin_setting("record_budget_mb", 256))
        )
        self.visible_only = CheckBox(
            text="visible region only",
            value=False,
            tooltip="record the evolution of the part on screen, at full resolution",
        )
        self.live = CheckBox(text="live view", value=True, tooltip="update layers and plot while the NCA runs")
        self.interval = SpinBox(
            label="live interval (ms)", min=20, max=10000, value=int(plugin_setting("live_interval_ms", 250))
        )
        self.keep = CheckBox(
            text="keep previous results",
            value=False,
            tooltip="off: a new recording's layers replace the previous one's",
        )
        self.channel = SpinBox(
            label="hidden channel",
            min=0,
            max=0,
            value=0,
            enabled=False,
            tooltip="which hidden channel the 'L<n> hidden' layers show",
        )
        self.memory = ElidedLabel(label="recording", value="")
        self.run_button = PushButton(text="Run and record")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.bar = ProgressBar(label="steps", min=0, max=1, value=0)
        self.status = ElidedLabel(label="status", value="ready")
        self.plot = ConvergencePlot()
        self.show_advanced, self.advanced = advanced_group(
            [self.seed, self.level, self.steps, self.budget, self.visible_only, self.interval, self.keep]
        )
        self.extend(
            [
                self.image,
                self.model,
                self.device,
                self.live,
                self.memory,
                self.show_advanced,
                self.advanced,
                self.run_button,
                self.cancel_button,
                self.bar,
                self.status,
                self.channel,
            ]
        )
        self.body.layout().addWidget(self.plot.canvas)
        self.job: Job | None = None
        self.recording = None
        self.readings: list[LevelReading] = []
        self.result_layers: list[Any] = []
        self._hidden: dict[int, np.ndarray] = {}  # level -> (channels, *shape), input axis order
        self.live_layers: dict[str, Any] = {}
        self._frame_shown = -math.inf
        self._frame_gap = 0.0
        self._plan: RecordPlan | None = None
        self._grid: Grid | None = None  # where the last run ran (RAS+ for NIfTI: shown in file order)
        self._chosen: tuple[Any, ...] = (None, None, 0)
        for w in (self.image, self.model, self.level):
            w.changed.connect(self._reset_steps)
        for w in (self.steps, self.budget, self.visible_only):
            w.changed.connect(self._update_memory)
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.request_cancel)
        self.channel.changed.connect(self._show_channel)
        on_dock_closed(self, self.request_cancel)
        follow_catalog(self, self.model.reset_choices)
        warm_up_in_background()  # the first run then does not stall the GUI loading kernels
        warm_up_layers(self.viewer, self.native)  # and napari shows its first layers without a stall
        ev = self.viewer.layers.events
        for e in (ev.inserted, ev.removed, ev.reordered):
            e.connect(self._layers_changed)
        self._layers_changed()
        self.end_layout()

    # -- planning -------------------------------------------------------------------------------
    def _layers_changed(self, *_: Any) -> None:
        self.image.reset_choices()
        layer = self.image.value
        name = ((getattr(layer, "metadata", None) or {}).get("octreenca") or {}).get("model")
        if name and name in CATALOG.names():
            self.model.value = name
        self._reset_steps()

    def _reset_steps(self, *_: Any) -> None:
        """Fill the steps field with what the model would use on this input (only when the image
        or the model changed: layers the inspector adds must not undo the user's steps)."""
        layer = self.image.value
        self.level.max = len(layer.data) - 1 if layer is not None and layer.multiscale else 0
        chosen = (self.image.value, self.model.value, self.level.value)
        if chosen == self._chosen and self.steps.value:
            return
        self._chosen = chosen
        try:
            cfg, shape_net, _ = self._geometry()
        except Exception:
            self.memory.value = "choose an image and a model"
            return
        self.steps.value = ", ".join(str(s) for s in cfg.steps_for(shape_net))
        self._update_memory()

    def _geometry(self) -> tuple[Any, tuple[int, ...], Any]:
        layer = self.image.value
        if layer is None or not self.model.value:
            raise ValueError("choose an image and a model")
        cfg = _config_of(self.model.value)
        grid = self._run_plan(cfg, layer_input(layer, self.level.value), steps=None).grid
        # Record what the NCA sees: the grid the planner chose (model spacing, RAS+ for NIfTI).
        return cfg, grid_model_shape(cfg, grid), grid_axis_plan(cfg, grid)

    def _run_plan(self, cfg: Any, src: Any, steps: list[int] | None) -> RunPlan:
        """The run Segment would make for this input (same planner), whole image, these steps."""
        options = RunOptions(
            device=self.device.value,
            seed=self.seed.value,
            tiling="whole",
            retry_tiled=False,
            steps=None if steps is None else tuple(steps),
        )
        return plan_run(cfg, src.geometry(), options)

    def parse_steps(self, levels: int) -> list[int] | None:
        """The steps field as a list (finest first), or None when empty."""
        text = self.steps.value.strip()
        if not text:
            return None
        steps = [int(s) for s in text.replace(";", ",").split(",") if s.strip()]
        if len(steps) != levels or any(s < 0 for s in steps):
            raise ValueError(
                f"give {levels} non-negative step counts, finest level first (e.g. {', '.join(['10'] * levels)})"
            )
        return steps

    def make_plan(self) -> tuple[RecordPlan, Any]:
        """The recording plan for the current choices (shown before the run)."""
        cfg, shape_net, ap = self._geometry()
        order = ap.to_input_order()
        region = None
        if self.visible_only.value:
            vis = visible_region(self.image.value)
            if vis is not None:
                grid = self._run_plan(cfg, layer_input(self.image.value, self.level.value), None).grid
                r = [m / n for n, m in zip(grid.input_shape, grid.grid_shape)]
                region = [(0, 0)] * len(order)
                for k, o in enumerate(order):
                    region[o] = (int(vis[k][0] * r[k]), max(int(vis[k][0] * r[k]) + 1, int(round(vis[k][1] * r[k]))))
        plan = plan_recording(
            cfg,
            shape_net,
            steps=self.parse_steps(cfg.levels),
            order=order,
            budget=self.budget.value * 1024**2,
            region=region,
        )
        return plan, ap

    def _update_memory(self, *_: Any) -> None:
        try:
            plan, _ = self.make_plan()
        except Exception as exc:
            self.memory.value = str(exc)
            return
        self._plan = plan
        self.memory.value = plan.describe()

    # -- running ---------------------------------------------------------------------------------
    def start(self, *_: Any) -> Job | None:
        from napari.utils.notifications import show_error

        if self.job is not None and self.job.running:
            return self.job
        try:
            plan, ap = self.make_plan()
        except Exception as exc:
            show_error(f"cannot record: {exc}")
            return None
        layer = self.image.value
        src = layer_input(layer, self.level.value)
        run_plan = self._run_plan(plan.config, src, list(plan.steps))
        grid = self._grid = run_plan.grid
        scale, translate = grid.cell_geometry(src.level_scale, src.translate)
        if grid.affine is not None:  # recorded on the RAS+ grid: geometry in that axis order
            scale, translate = _to_grid_order(grid, scale), _to_grid_order(grid, translate)
        model_name, device = self.model.value, self.device.value
        live, interval = self.live.value, self.interval.value / 1000.0
        base = f"{layer.name} NCA"
        # The live layers are the run's "hidden RGB" and "logits" layers from the start (the
        # previous run's when they are replaced): at the end they take the whole evolution, and
        # napari neither adds nor removes a layer (each removal costs it a full gc.collect()).
        replace = [] if self.keep.value else list(self.result_layers)
        run_prefix = free_prefix(self.viewer, base, [" hidden RGB", " logits", " labels"], ignore=replace)
        channel = int(self.channel.value)
        self.memory.value = plan.describe()

        throttle = Throttle(0.1)

        # A first live run adds its live layer at the click: the engine (on every core) starts once
        # the GUI has painted it, not while (it made that paint twice as long).
        painted = threading.Event()

        def work(job: Job) -> Any:
            model = CATALOG.load(model_name, device)
            painted.wait(1.0)

            def on_frame(frame: Frame) -> None:
                job.relay.frame.emit(frame)

            # Without live mode the frames (small copies) still drive the progress bar.
            rec = NCARecorder(plan, on_frame=on_frame, throttle=interval)
            seg = execute(
                model,
                run_plan,
                src.array,
                callback=rec,
                cancel=job.cancel,
                prepare_callback=job.prepare_callback(throttle),
            )
            # The layers' data is made here, off the GUI thread (on it, it took 0.3-0.5 s).
            return rec.recording, seg, _result_layers(rec.recording, seg, src, scale, translate, grid, channel)

        def done(result: Any) -> None:
            recording, seg, (layers, hidden) = result
            self.segmentation = seg
            self._show_recording(recording, layers, hidden, base, len(src.scale))

        self.job = Job(
            work,
            on_done=done,
            on_finished=self._finished,
            on_cancelled=self._remove_live,
            on_error=lambda exc: self._remove_live(),
            what="NCA recording",
        )
        self.job.relay.frame.connect(lambda f: self._on_frame(f, plan, scale, translate, run_prefix, live))
        self.job.relay.progress.connect(self._on_prepare)
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.bar.max, self.bar.value = plan.total_steps, 0
        self.status.value = "running"
        if live and plan.record_evolution:
            # The live layers exist before the run starts: adding a layer is napari's slowest
            # step (0.3-0.8 s on the dev machine) and must not freeze the GUI mid-run.
            eshape = plan.evolution_shape
            self._show_live(
                np.zeros(eshape + (3,), np.uint8),
                np.zeros((plan.config.output_channels,) + eshape, np.float32),
                plan,
                scale,
                translate,
                run_prefix,
            )
        self._frame_shown, self._frame_gap = -math.inf, 0.0
        self.plot.setup(plan.steps, plan.config.steps, plan.config.fire_rate)
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, painted.set)
        self.job.start()
        return self.job

    def _show_recording(
        self, recording: Any, probe: list[Any], hidden: dict[int, Any], base: str, n_spatial: int
    ) -> None:
        """Show the recording's layers (in place of the previous recording's unless kept; the live
        layers become its evolution layers), then put the sliders on the result (finest level, last
        step) and read the convergence. The job ends once every layer is shown (one per event-loop
        turn)."""
        self.recording = recording
        self._hidden = hidden
        channels = max((h.shape[0] for h in hidden.values()), default=0)
        self.channel.max = max(0, channels - 1)
        self.channel.enabled = channels > 1
        replace = [] if self.keep.value else list(self.result_layers)
        live = list(self.live_layers.values())
        self.live_layers = {}
        prefix = free_prefix(self.viewer, base, [kw["name"] for _, kw, _ in probe], ignore=replace + live)
        layers = [(d, {**kw, "name": prefix + kw["name"]}, t) for d, kw, t in probe]
        job = self.job
        if job is not None:
            job.hold()

        def placed() -> None:
            try:
                self._after_recording_shown(recording, n_spatial)
            finally:
                if job is not None:
                    job.release()

        self.result_layers = place_layers(
            self.viewer, layers, replace=replace, drop=live, grow=live, owner=self.native, on_placed=placed
        )

    def _after_recording_shown(self, recording: Any, n_spatial: int) -> None:
        plan = recording.plan
        if plan.record_evolution:
            # The result: finest level, its last step; the sliders then replay the automaton.
            level_axis = self.viewer.dims.ndim - n_spatial - 2
            if level_axis >= 0:
                self.viewer.dims.set_point(level_axis, 0)
                self.viewer.dims.set_point(level_axis + 1, max(0, plan.steps[0] - 1))
        self.plot.show_all(recording.convergence, recording.label_changes)
        cfg = plan.config
        self.readings = [
            level_reading(
                lv,
                recording.convergence.get(lv, []),
                recording.label_changes.get(lv, []),
                cfg.steps[lv] if lv < len(cfg.steps) else 0,
                cfg.fire_rate,
            )
            for lv in range(cfg.levels - 1, -1, -1)
        ]
        self.status.value = "; ".join(r.text for r in self.readings)

    def _show_channel(self, *_: Any) -> None:
        """Show hidden channel ``k`` in every level's hidden layer (no channel slider needed)."""
        k = int(self.channel.value)
        for layer in self.result_layers:
            meta = (layer.metadata or {}).get("octreenca") or {}
            h = self._hidden.get(meta.get("level", -1)) if meta.get("kind") == "hidden" else None
            if h is not None and k < h.shape[0] and layer in self.viewer.layers:
                layer.data = self._grid.to_input_orientation(h[k]) if self._grid is not None else h[k]
                layer.metadata = {**layer.metadata, "octreenca": {**meta, "channel": k}}

    def request_cancel(self, *_: Any) -> None:
        if self.job is not None and self.job.running:
            self.job.request_cancel()
            self.status.value = "cancelling"

    def _on_prepare(self, p: dict[str, Any]) -> None:
        """Progress of a derived input channel (a video model's motion), before the first step."""
        self.status.value = f"computing {p.get('stage', 'input')}: frame {p['frame']}/{p['frames']}"

    def _on_frame(
        self,
        frame: Frame,
        plan: RecordPlan,
        cell_scale: tuple[float, ...],
        cell_translate: tuple[float, ...],
        prefix: str,
        live: bool,
    ) -> None:
        self.plot.append(frame.convergence, frame.label_changes)  # data only: cheap
        # Every widget repaint makes Qt recompose the window around the (software) OpenGL
        # canvas: show a frame only when the GUI work of the last one (its repaints included)
        # took at most a fifth of the time since, so the GUI stays responsive and the run
        # keeps its CPU. Frames in between only extend the plot's data.
        now = time.monotonic()
        if now - self._frame_shown < self._frame_gap and frame.done < frame.total:
            return
        self._frame_shown = now
        started = time.perf_counter()
        self.bar.value = frame.done
        self.status.value = (
            f"level {frame.level} step {frame.step + 1} of {plan.steps[frame.level]} ({frame.done}/{frame.total})"
        )
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, lambda: self._frame_cost(started, live))
        if not live or frame.rgb is None:
            return
        self.plot.refresh()
        self._show_live(frame.rgb, frame.logits, plan, cell_scale, cell_translate, prefix)

    def _show_live(
        self,
        rgb: np.ndarray,
        logits: np.ndarray,
        plan: RecordPlan,
        cell_scale: tuple[float, ...],
        cell_translate: tuple[float, ...],
        prefix: str,
    ) -> None:
        """Put a frame (network axis order) into the live layers, adding them the first time."""
        order = plan.order
        rgb = rgb.transpose(*order, len(order))
        logits = logits.transpose(0, *(1 + o for o in order))
        es = plan.evolution_stride
        start = [plan.region[o][0] for o in order]
        scale = tuple(s * es for s in cell_scale)
        translate = tuple(t + a * s for t, a, s in zip(cell_translate, start, cell_scale))
        if self._grid is not None and self._grid.affine is not None:  # RAS+ grid -> the file's order
            rgb, kw_rgb = _to_file_order(self._grid, rgb, {"rgb": True, "scale": scale, "translate": translate})
            logits, _ = _to_file_order(self._grid, logits, {})
            scale, translate = kw_rgb["scale"], kw_rgb["translate"]
        # A reused layer keeps the result layers' axes (class,) level, step, space: the frame at
        # every level and step (a broadcast view, no copy).
        ls = (plan.config.levels, max(1, max(plan.steps)))
        if logits.shape[0] == 1:
            live_logits = np.broadcast_to(logits[0], ls + logits.shape[1:])
        else:
            live_logits = np.broadcast_to(logits[:, None, None], logits.shape[:1] + ls + logits.shape[1:])
        n_lead = live_logits.ndim - len(scale)
        # Only the (visible) hidden RGB layer is added for a run: each new layer stalls the GUI
        # about 0.1 s under software OpenGL, one with new axes 0.16 s (napari makes new dims
        # sliders). So a new one shows the frame alone, and takes the level and step axes with
        # the whole evolution at the end, in a turn of its own. The (hidden) logits layer follows
        # the frames only when the previous run left one to reuse; else it comes with the results.
        for key, name, data, kw, add in (
            ("rgb", " hidden RGB", np.broadcast_to(rgb, ls + rgb.shape), {"rgb": True, "opacity": 0.8}, True),
            (
                "logits",
                " logits",
                live_logits,
                {"colormap": "magma", "visible": False, "contrast_limits": (-1, 1)},
                False,
            ),
        ):
            layer = self.live_layers.get(key)
            if layer is None or layer not in self.viewer.layers:
                lead = n_lead if key == "logits" else 2
                geo = {"scale": (1.0,) * lead + scale, "translate": (0.0,) * lead + translate}
                layer = self._live_layer(prefix + name, data, {**geo, **kw}, add)
                if layer is not None:
                    self.live_layers[key] = layer
            elif layer.ndim < len(scale) + 2:  # this run's new layer: the frame alone
                layer.data = data[0, 0]
            elif layer.visible:  # an invisible layer gets the newest data when the run ends
                layer.data = data

    def _live_layer(self, name: str, data: np.ndarray, kwargs: dict[str, Any], add: bool) -> Any:
        """The previous run's layer of that name (replaced, not kept) showing the live frames,
        else a new layer if ``add``, else None."""
        from napari.layers import Image

        replaced = [] if self.keep.value else self.result_layers
        old = next((ly for ly in replaced if ly.name == name and ly in self.viewer.layers), None)
        rgb = bool(kwargs.get("rgb", False))
        if old is not None and isinstance(old, Image) and bool(old.rgb) == rgb and old.ndim == data.ndim - rgb:
            update_layer(old, data, {k: v for k, v in kwargs.items() if k in ("scale", "translate")})
            return old
        if not add:
            return None
        # The frame alone (a view of it), without the two lead axes (level, step).
        geo = {k: tuple(kwargs[k][2:]) for k in ("scale", "translate")}
        return self.viewer.add_image(data[0, 0], name=name, **{**kwargs, **geo})

    def _frame_cost(self, started: float, live: bool) -> None:
        """Space the next shown frame by five times what this one cost the GUI thread."""
        interval = self.interval.value / 1000.0 if live else 0.25
        self._frame_gap = max(interval, 5.0 * (time.perf_counter() - started))

    def _remove_live(self) -> None:
        remove_layers(self.viewer, self.live_layers.values())
        self.live_layers = {}

    def _finished(self) -> None:
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        if self.job is not None and self.job.cancelled:
            self.status.value = "cancelled"


def _result_layers(
    recording: Any,
    seg: Any,
    src: Any,
    scale: tuple[float, ...],
    translate: tuple[float, ...],
    grid: Grid,
    channel: int,
) -> tuple[list[Any], dict[int, Any]]:
    """The recording's layer-data tuples (names without the run's prefix) in the file's axis
    order, the labels last, and the hidden states per level (worker thread: no napari object)."""
    hidden = recording.in_input_order().hidden
    channels = max((h.shape[0] for h in hidden.values()), default=0)
    k = min(channel, max(0, channels - 1))
    # Recorded on the planner's grid (RAS+ for a NIfTI volume): shown in the file's axis order.
    layers = [
        (*_to_file_order(grid, d, kw), kind)
        for d, kw, kind in recording_layers(recording, scale=scale, translate=translate, prefix="", channel=k)
    ]
    layers += [
        (d, {**kw, "name": " labels"}, kind)
        for d, kw, kind in output_layers(seg, src, record={"engine": dict(seg.record)})
    ]
    return layers, hidden


def _to_grid_order(grid: Grid, values: tuple[float, ...]) -> tuple[float, ...]:
    """Per-axis values in the file's (Z, Y, X) order -> the RAS+ grid's order."""
    from ..run.resample import ras_axis_permutation

    out = [0.0] * len(values)
    for i, j in enumerate(ras_axis_permutation(grid.affine)):
        out[j] = values[i]
    return tuple(out)


def _to_file_order(grid: Grid, data: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A recorded layer on a RAS+ grid put back in the file's axis order (data, scale, translate)."""
    if grid.affine is None:
        return data, kwargs
    import numpy as np

    from ..run.resample import ras_axis_permutation

    perm = ras_axis_permutation(grid.affine)
    rgb = bool(kwargs.get("rgb"))
    arr = np.moveaxis(np.asarray(data), -1, 0) if rgb else np.asarray(data)
    arr = grid.to_input_orientation(arr)
    arr = np.moveaxis(arr, 0, -1) if rgb else arr
    kw = dict(kwargs)
    for key in ("scale", "translate"):
        if key in kw:
            vals = list(kw[key])
            lead, sp = vals[:-3], vals[-3:]
            kw[key] = tuple(lead + [sp[j] for j in perm])
    return arr, kw


__all__ = ["InspectorWidget", "ConvergencePlot", "visible_region"]
