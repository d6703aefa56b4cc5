"""The NCA inspector: watch the automaton work.

Runs a model on an Image layer while an :class:`~napari_octreenca.run.recorder.NCARecorder` keeps
every level's hidden channels, the step-by-step evolution (logits and a PCA colour view of the
hidden state, on the visible region or at reduced resolution so memory stays bounded) and the
convergence per level. The memory the recording takes is shown before the run. In live mode the
layers update while the NCA iterates (throttled). A convergence plot shows whether each level
reached its fixed point; edit the steps per level and record again to try more test-time steps.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, Label, LineEdit, ProgressBar, PushButton, SpinBox

from ..run.inputs import plan_axes
from ..run.planner import Grid, RunOptions, RunPlan, plan_run
from ..run.execute import execute
from ..run.recorder import Frame, NCARecorder, RecordPlan, plan_recording, recording_layers
from ._devices import list_devices
from ._layers import layer_input, output_layers
from ._models import CATALOG, follow_catalog
from ._settings import plugin_setting
from ._workers import Job
from .segment_widget import _config_of, _fixed_width, image_layer_choices

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
    """Mean absolute update per step, one small plot per level (matplotlib in a Qt canvas)."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4.5, 2.0), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(170)
        self.axes: list[Any] = []

    @property
    def lines(self) -> list[Any]:
        return [ln for ax in self.axes for ln in ax.lines]

    def show(self, convergence: dict[int, list[float]], steps: tuple[int, ...]) -> None:
        """One panel per level, coarsest first (the order the NCA runs them); log scale."""
        self.figure.clear()
        n = len(steps)
        self.axes = list(np.atleast_1d(self.figure.subplots(1, n, sharey=True)))
        for i, level in enumerate(range(n - 1, -1, -1)):
            ax = self.axes[i]
            ys = np.array([y if math.isfinite(y) and y > 0 else np.nan for y in convergence.get(level, [])])
            if ys.size:
                ax.plot(np.arange(1, ys.size + 1), ys, lw=1.2, color=f"C{level}")
            ax.set_yscale("log")
            ax.set_xlim(0.5, max(1, steps[level]) + 0.5)
            ok = converged(convergence.get(level, []))
            ax.set_title(f"L{level}" + (" ok" if ok else ""), fontsize=8)
            ax.tick_params(labelsize=6)
            ax.set_xlabel("step", fontsize=7)
        if self.axes:
            self.axes[0].set_ylabel("mean |update|", fontsize=7)
        self.canvas.draw_idle()


def converged(curve: list[float], ratio: float = 0.05) -> bool:
    """Whether a level's update shrank to ``ratio`` of its first step (near a fixed point)."""
    ys = [y for y in curve if math.isfinite(y)]
    return len(ys) >= 2 and ys[0] > 0 and ys[-1] <= ratio * ys[0]


class InspectorWidget(Container):
    """Record and show an OctreeNCA's hidden channels, evolution and convergence (dock widget)."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__(labels=True)
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
        self.visible_only = CheckBox(text="evolution of the visible region only", value=False)
        self.live = CheckBox(text="live: update layers while the NCA runs", value=True)
        self.interval = SpinBox(label="live interval (ms)", min=20, max=10000,
                                value=int(plugin_setting("live_interval_ms", 250)))
        self.memory = Label(label="recording", value="")
        self.run_button = PushButton(text="Run and record")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.bar = ProgressBar(label="steps", min=0, max=1, value=0)
        self.status = Label(label="status", value="ready")
        self.plot = ConvergencePlot()
        self.extend([self.image, self.model, self.device, self.seed, self.level, self.steps, self.budget, self.visible_only,
                     self.live, self.interval, self.memory, self.run_button, self.cancel_button, self.bar,
                     self.status])
        self.native.layout().addWidget(self.plot.canvas)
        _fixed_width(self.status, self.memory)
        self.job: Job | None = None
        self.recording = None
        self.live_layers: dict[str, Any] = {}
        self._plan: RecordPlan | None = None
        self._chosen: tuple[Any, ...] = (None, None, 0)
        for w in (self.image, self.model, self.level):
            w.changed.connect(self._reset_steps)
        for w in (self.steps, self.budget, self.visible_only):
            w.changed.connect(self._update_memory)
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.request_cancel)
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
        grid = self._run_plan(cfg, layer_input(layer, self.level.value), steps=None).grid
        ap = plan_axes(_with_channels(grid), cfg, grid.axes)
        # Record what the NCA sees: the grid the planner chose (model spacing, RAS+ for NIfTI).
        by_axis = dict(zip(ap.spatial_input_axes, grid.grid_shape))
        return cfg, tuple(by_axis[a] for a in ap.model_axes), ap

    def _run_plan(self, cfg: Any, src: Any, steps: list[int] | None) -> RunPlan:
        """The run Segment would make for this input (same planner), whole image, these steps."""
        options = RunOptions(device=self.device.value, seed=self.seed.value, tiling="whole", retry_tiled=False,
                             steps=None if steps is None else tuple(steps))
        return plan_run(cfg, src.geometry(), options)

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
                grid = self._run_plan(cfg, layer_input(self.image.value, self.level.value), None).grid
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
        run_plan = self._run_plan(plan.config, src, list(plan.steps))
        grid = run_plan.grid
        scale, translate = grid.cell_geometry(src.level_scale, src.translate)
        if grid.affine is not None:  # recorded on the RAS+ grid: geometry in that axis order
            scale, translate = _to_grid_order(grid, scale), _to_grid_order(grid, translate)
        model_name, device = self.model.value, self.device.value
        live, interval = self.live.value, self.interval.value / 1000.0
        prefix = f"{layer.name} NCA"
        self.memory.value = plan.describe()

        def work(job: Job) -> Any:
            model = CATALOG.load(model_name, device)

            def on_frame(frame: Frame) -> None:
                job.relay.frame.emit(frame)

            # Without live mode the frames (small copies) still drive the progress bar.
            rec = NCARecorder(plan, on_frame=on_frame, throttle=interval)
            seg = execute(model, run_plan, src.array, callback=rec, cancel=job.cancel)
            return rec.recording, seg

        def done(result: Any) -> None:
            recording, seg = result
            self._remove_live()
            self.recording, self.segmentation = recording, seg
            for data, kwargs, kind in recording_layers(recording, scale=scale, translate=translate,
                                                       prefix=prefix):
                data, kwargs = _to_file_order(grid, data, kwargs)
                self.viewer._add_layer_from_data(data, kwargs, kind)
            for data, kwargs, kind in output_layers(seg, src, record={"engine": dict(seg.record)}):
                kwargs["name"] = f"{prefix} labels"
                self.viewer._add_layer_from_data(data, kwargs, kind)
            # Show the last step: the slider then replays the automaton backwards from the result.
            step_axis = self.viewer.dims.ndim - len(src.scale) - 1
            if step_axis >= 0 and plan.record_evolution:
                self.viewer.dims.set_point(step_axis, plan.total_steps - 1)
            self.plot.show(recording.convergence, plan.steps)
            flags = [f"L{lv} {'converged' if converged(c) else 'still changing'}"
                     for lv, c in sorted(recording.convergence.items())]
            self.status.value = "; ".join(flags)

        self.job = Job(work, on_done=done, on_finished=self._finished, on_cancelled=self._remove_live,
                       on_error=lambda exc: self._remove_live(), what="NCA recording")
        self.job.relay.frame.connect(lambda f: self._on_frame(f, plan, scale, translate, prefix, live))
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.bar.max, self.bar.value = plan.total_steps, 0
        self.status.value = "running"
        self.job.start()
        return self.job

    def request_cancel(self, *_: Any) -> None:
        if self.job is not None and self.job.running:
            self.job.request_cancel()
            self.status.value = "cancelling"

    def _on_frame(self, frame: Frame, plan: RecordPlan, cell_scale: tuple[float, ...],
                  cell_translate: tuple[float, ...], prefix: str, live: bool) -> None:
        self.bar.value = frame.done
        self.status.value = f"level {frame.level} step {frame.step + 1} ({frame.done}/{frame.total})"
        if not live or frame.rgb is None:
            return
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
            else:
                layer.data = data
        self.plot.show(frame.convergence, plan.steps)

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


def _with_channels(grid: Grid) -> tuple[int, ...]:
    """An array shape on ``grid`` (3 for a colour axis) for axis planning."""
    it = iter(grid.grid_shape)
    return tuple(3 if a == "C" else next(it) for a in grid.axes)


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


__all__ = ["InspectorWidget", "ConvergencePlot", "visible_region", "converged"]
