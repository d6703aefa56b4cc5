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
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, LineEdit, ProgressBar, PushButton, SpinBox

from ..run.inputs import plan_axes
from ..run.recorder import (
    Frame, LevelReading, NCARecorder, RecordPlan, expected_update, level_reading, plan_recording,
    reading_window, recording_layers,
)
from ._devices import list_devices
from ._layers import layer_input
from ._models import CATALOG, follow_catalog
from ._settings import plugin_setting
from ._spacing import GridPlan, grid_plan, to_grid
from ._workers import Job
from .qt_helpers import DockContainer, ElidedLabel, advanced_group, on_dock_closed
from .shared import add_layers, free_prefix, image_layer_choices, remove_layers
from .shared import config_of as _config_of
from .shared import level_scale as _level_scale

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


class ConvergencePlot:
    """The convergence of every level on one time line (coarsest level first, the order the NCA
    runs them): the expected update per step (fire-rate adjusted, mean over a short window; log
    scale, left) and the share of cells whose label changed (right), with the steps the model
    was trained with marked. Built once per run by :meth:`setup`; :meth:`append` adds line data
    and :meth:`refresh` redraws at most every ``min_interval`` seconds (a live run never
    rebuilds the figure)."""

    def __init__(self, min_interval: float = 0.5) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4.2, 1.9), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(150)
        self.min_interval = min_interval
        self.builds = 0  # figure (re)builds: one per run
        self.draws = 0
        self._last_draw = -math.inf
        self._dirty = False
        self.axes: list[Any] = []
        self._update_lines: dict[int, Any] = {}
        self._change_lines: dict[int, Any] = {}
        self.update: dict[int, list[float]] = {}
        self.changes: dict[int, list[float]] = {}
        self._offsets: dict[int, int] = {}
        self._steps: tuple[int, ...] = ()
        self._trained: tuple[int, ...] = ()
        self._fire_rate = 0.5

    @property
    def lines(self) -> list[Any]:
        return list(self._update_lines.values()) + list(self._change_lines.values())

    def setup(self, steps: tuple[int, ...], trained: tuple[int, ...], fire_rate: float) -> None:
        """Empty axes for a run with ``steps`` per level (finest first)."""
        self.figure.clear()
        self.builds += 1
        self._steps, self._trained, self._fire_rate = tuple(steps), tuple(trained), fire_rate
        self.update, self.changes = {}, {}
        ax = self.figure.add_subplot(111)
        ax2 = ax.twinx()
        self.axes = [ax, ax2]
        n = len(steps)
        x0 = 0
        self._offsets = {}
        for level in range(n - 1, -1, -1):
            self._offsets[level] = x0
            colour = f"C{level % 10}"
            (self._update_lines[level],) = ax.plot([], [], lw=1.3, color=colour)
            (self._change_lines[level],) = ax2.plot([], [], lw=0.9, ls=":", color=colour)
            if level < len(trained) and trained[level] != steps[level] and 0 < trained[level]:
                ax.axvline(x0 + trained[level] + 0.5, color=colour, lw=0.8, ls="--")
            ax.text(x0 + max(1, steps[level]) / 2 + 0.5, 1.0, f"L{level}", transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7, color=colour)
            x0 += steps[level]
            if level:
                ax.axvline(x0 + 0.5, color="0.7", lw=0.6)
        ax.set_xlim(0.5, max(1, x0) + 0.5)
        ax.set_yscale("log")
        ax.set_ylim(1e-4, 1.0)
        ax2.set_ylim(0.0, 0.05)
        ax.set_xlabel("step (coarsest level first; dashed: trained steps)", fontsize=7)
        ax.set_ylabel("update", fontsize=7)
        ax2.set_ylabel("labels changed", fontsize=7)
        ax2.yaxis.set_major_formatter(_percent())
        for a in self.axes:
            a.tick_params(labelsize=6)
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
        """Replace the curves with a finished recording's and draw now."""
        self.update = {k: list(v) for k, v in update.items()}
        self.changes = {k: list(v) for k, v in changes.items()}
        self._dirty = True
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> bool:
        """Redraw if something changed and the last draw is ``min_interval`` old (or ``force``)."""
        now = time.monotonic()
        if not self._dirty or (not force and now - self._last_draw < self.min_interval):
            return False
        lo, hi, top = math.inf, 0.0, 0.0
        for level, line in self._update_lines.items():
            values = self.update.get(level, [])
            y = expected_update(values, self._fire_rate, reading_window(self._level_steps(level)))
            x = self._offsets.get(level, 0) + np.arange(1, y.size + 1)
            line.set_data(x, y)
            ch = np.asarray(self.changes.get(level, []), dtype=float)
            self._change_lines[level].set_data(self._offsets.get(level, 0) + np.arange(1, ch.size + 1), ch)
            finite = y[np.isfinite(y) & (y > 0)]
            if finite.size:
                lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
            if np.isfinite(ch).any():
                top = max(top, float(np.nanmax(ch)))
        if self.axes and math.isfinite(lo):
            self.axes[0].set_ylim(lo / 2, hi * 2)
        if self.axes:
            self.axes[1].set_ylim(0.0, max(0.01, top * 1.1))
        self.canvas.draw_idle()
        self.draws += 1
        self._last_draw = now
        self._dirty = False
        return True

    def _level_steps(self, level: int) -> int:
        return self._steps[level] if level < len(self._steps) else 1


def _percent() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=1)


def converged(curve: list[float], ratio: float = 0.05) -> bool:
    """Whether a level's update shrank to ``ratio`` of its first step (near a fixed point)."""
    ys = [y for y in curve if math.isfinite(y)]
    return len(ys) >= 2 and ys[0] > 0 and ys[-1] <= ratio * ys[0]


class InspectorWidget(DockContainer):
    """Record and show an OctreeNCA's hidden channels, evolution and convergence (dock widget)."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=lambda _w: image_layer_choices(self.viewer))
        self.model = ComboBox(label="model", choices=lambda _w: CATALOG.names())
        self.device = ComboBox(label="device", choices=[(d.label, d.id) for d in list_devices()])
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.level = SpinBox(label="pyramid level", min=0, max=0, value=0,
                             tooltip="multiscale inputs: the resolution level to run on (0 = finest)")
        self.steps = LineEdit(label="steps per level", value="",
                              tooltip="finest level first; raise them to try more test-time steps")
        self.budget = SpinBox(label="memory budget (MB)", min=16, max=65536,
                              value=int(plugin_setting("record_budget_mb", 256)))
        self.visible_only = CheckBox(text="visible region only", value=False,
                                     tooltip="record the evolution of the part on screen, at full resolution")
        self.live = CheckBox(text="live view", value=True, tooltip="update layers and plot while the NCA runs")
        self.interval = SpinBox(label="live interval (ms)", min=20, max=10000,
                                value=int(plugin_setting("live_interval_ms", 250)))
        self.keep = CheckBox(text="keep previous results", value=False,
                             tooltip="off: a new recording's layers replace the previous one's")
        self.channel = SpinBox(label="hidden channel", min=0, max=0, value=0, enabled=False,
                               tooltip="which hidden channel the 'L<n> hidden' layers show")
        self.memory = ElidedLabel(label="recording", value="")
        self.run_button = PushButton(text="Run and record")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.bar = ProgressBar(label="steps", min=0, max=1, value=0)
        self.status = ElidedLabel(label="status", value="ready")
        self.plot = ConvergencePlot()
        self.show_advanced, self.advanced = advanced_group([
            self.seed, self.level, self.steps, self.budget, self.visible_only, self.interval, self.keep])
        self.extend([self.image, self.model, self.device, self.live, self.memory, self.show_advanced,
                     self.advanced, self.run_button, self.cancel_button, self.bar, self.status, self.channel])
        self.body.layout().addWidget(self.plot.canvas)
        self.job: Job | None = None
        self.recording = None
        self.readings: list[LevelReading] = []
        self.result_layers: list[Any] = []
        self._hidden: dict[int, np.ndarray] = {}  # level -> (channels, *shape), input axis order
        self.live_layers: dict[str, Any] = {}
        self._plan: RecordPlan | None = None
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
        ev = self.viewer.layers.events
        for e in (ev.inserted, ev.removed, ev.reordered):
            e.connect(self._layers_changed)
        self._layers_changed()

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
        src = layer_input(layer, self.level.value)
        ap = plan_axes(tuple(src.array.shape), cfg, src.axes)
        order = ap.to_input_order()
        # Fixed-spacing models run on the model's grid: record what the NCA sees there.
        shape_in = self._grid(cfg, src).grid_shape
        shape_net = [0] * len(shape_in)
        for k, o in enumerate(order):
            shape_net[o] = shape_in[k]
        return cfg, tuple(shape_net), ap

    @staticmethod
    def _grid(cfg: Any, src: Any) -> GridPlan:
        sp = _level_scale(src)
        return grid_plan(cfg, tuple(src.array.shape), src.axes, sp, {}, spacing=sp)

    def parse_steps(self, levels: int) -> list[int] | None:
        """The steps field as a list (finest first), or None when empty."""
        text = self.steps.value.strip()
        if not text:
            return None
        steps = [int(s) for s in text.replace(";", ",").split(",") if s.strip()]
        if len(steps) != levels or any(s < 0 for s in steps):
            raise ValueError(f"give {levels} non-negative step counts, finest level first (e.g. "
                             f"{', '.join(['10'] * levels)})")
        return steps

    def make_plan(self) -> tuple[RecordPlan, Any]:
        """The recording plan for the current choices (shown before the run)."""
        cfg, shape_net, ap = self._geometry()
        order = ap.to_input_order()
        region = None
        if self.visible_only.value:
            vis = visible_region(self.image.value)
            if vis is not None:
                grid = self._grid(cfg, layer_input(self.image.value, self.level.value))
                r = [m / n for n, m in zip(grid.input_shape, grid.grid_shape)]
                region = [(0, 0)] * len(order)
                for k, o in enumerate(order):
                    region[o] = (int(vis[k][0] * r[k]), max(int(vis[k][0] * r[k]) + 1, int(round(vis[k][1] * r[k]))))
        plan = plan_recording(cfg, shape_net, steps=self.parse_steps(cfg.levels), order=order,
                              budget=self.budget.value * 1024**2, region=region)
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
        grid = self._grid(plan.config, src)
        scale, translate = grid.cell_geometry(_level_scale(src), src.translate)
        model_name, device, seed = self.model.value, self.device.value, self.seed.value
        live, interval = self.live.value, self.interval.value / 1000.0
        base = f"{layer.name} NCA"
        self.memory.value = plan.describe()

        def work(job: Job) -> Any:
            from ..run.inference import segment

            model = CATALOG.load(model_name, device)

            def on_frame(frame: Frame) -> None:
                job.relay.frame.emit(frame)

            # Without live mode the frames (small copies) still drive the progress bar.
            rec = NCARecorder(plan, on_frame=on_frame, throttle=interval)
            array = to_grid(src.array, model.config, grid)
            segment(model, array, axes=grid.axes, device=device, seed=seed, steps=list(plan.steps),
                    callback=rec, cancel=job.cancel)
            return rec.recording

        def done(recording: Any) -> None:
            self._remove_live()
            self._show_recording(recording, scale, translate, base, len(src.scale))

        self.job = Job(work, on_done=done, on_finished=self._finished, on_cancelled=self._remove_live,
                       on_error=lambda exc: self._remove_live(), what="NCA recording")
        self.job.relay.frame.connect(lambda f: self._on_frame(f, plan, scale, translate, base, live))
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.bar.max, self.bar.value = plan.total_steps, 0
        self.status.value = "running"
        self.plot.setup(plan.steps, plan.config.steps, plan.config.fire_rate)
        self.job.start()
        return self.job

    def _show_recording(self, recording: Any, scale: tuple[float, ...], translate: tuple[float, ...], base: str,
                        n_spatial: int) -> None:
        """Add the recording's layers (replacing the previous recording's unless kept), put the
        sliders on the result (finest level, last step) and read the convergence."""
        plan = recording.plan
        self.recording = recording
        self._hidden = recording.in_input_order().hidden
        channels = max((h.shape[0] for h in self._hidden.values()), default=0)
        self.channel.max = max(0, channels - 1)
        self.channel.enabled = channels > 1
        k = min(self.channel.value, self.channel.max)
        at = remove_layers(self.viewer, [] if self.keep.value else self.result_layers)
        probe = recording_layers(recording, scale=scale, translate=translate, prefix="", channel=k)
        prefix = free_prefix(self.viewer, base, [kw["name"] for _, kw, _ in probe])
        layers = [(d, {**kw, "name": prefix + kw["name"]}, t) for d, kw, t in probe]
        self.result_layers = add_layers(self.viewer, layers, at=at)
        if plan.record_evolution:
            # The result: finest level, its last step; the sliders then replay the automaton.
            level_axis = self.viewer.dims.ndim - n_spatial - 2
            if level_axis >= 0:
                self.viewer.dims.set_point(level_axis, 0)
                self.viewer.dims.set_point(level_axis + 1, max(0, plan.steps[0] - 1))
        self.plot.show_all(recording.convergence, recording.label_changes)
        cfg = plan.config
        self.readings = [level_reading(lv, recording.convergence.get(lv, []), recording.label_changes.get(lv, []),
                                       cfg.steps[lv] if lv < len(cfg.steps) else 0, cfg.fire_rate)
                         for lv in range(cfg.levels - 1, -1, -1)]
        self.status.value = "; ".join(r.text for r in self.readings)

    def _show_channel(self, *_: Any) -> None:
        """Show hidden channel ``k`` in every level's hidden layer (no channel slider needed)."""
        k = int(self.channel.value)
        for layer in self.result_layers:
            meta = (layer.metadata or {}).get("octreenca") or {}
            h = self._hidden.get(meta.get("level", -1)) if meta.get("kind") == "hidden" else None
            if h is not None and k < h.shape[0] and layer in self.viewer.layers:
                layer.data = h[k]
                layer.metadata = {**layer.metadata, "octreenca": {**meta, "channel": k}}

    def request_cancel(self, *_: Any) -> None:
        if self.job is not None and self.job.running:
            self.job.request_cancel()
            self.status.value = "cancelling"

    def _on_frame(self, frame: Frame, plan: RecordPlan, cell_scale: tuple[float, ...],
                  cell_translate: tuple[float, ...], prefix: str, live: bool) -> None:
        self.bar.value = frame.done
        self.status.value = (f"level {frame.level} step {frame.step + 1} of {plan.steps[frame.level]} "
                             f"({frame.done}/{frame.total})")
        self.plot.append(frame.convergence, frame.label_changes)
        if not live or frame.rgb is None:
            return
        self.plot.refresh()
        order = plan.order
        rgb = frame.rgb.transpose(*order, len(order))
        logits = frame.logits.transpose(0, *(1 + o for o in order))
        es = plan.evolution_stride
        start = [plan.region[o][0] for o in order]
        scale = tuple(s * es for s in cell_scale)
        translate = tuple(t + a * s for t, a, s in zip(cell_translate, start, cell_scale))
        for key, data, kw in (
            ("rgb", rgb, {"rgb": True, "opacity": 0.8}),
            ("logits", logits[0] if logits.shape[0] == 1 else logits,
             {"colormap": "magma", "visible": False}),
        ):
            layer = self.live_layers.get(key)
            if layer is None or layer not in self.viewer.layers:
                self.live_layers[key] = self.viewer.add_image(
                    data, name=f"{prefix} live {key}", scale=((1.0,) if data.ndim > len(scale) + (key == 'rgb') else ())
                    + scale, translate=((0.0,) if data.ndim > len(scale) + (key == 'rgb') else ()) + translate, **kw)
            elif layer.visible:  # an invisible layer gets the newest data when the run ends
                layer.data = data

    def _remove_live(self) -> None:
        for layer in self.live_layers.values():
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self.live_layers = {}

    def _finished(self) -> None:
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        if self.job is not None and self.job.cancelled:
            self.status.value = "cancelled"


__all__ = ["InspectorWidget", "ConvergencePlot", "visible_region", "converged"]
