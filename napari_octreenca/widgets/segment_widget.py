"""The Segment widget: pick an image, a model, a device; segment in a worker with cancel.

The run happens in a napari worker thread. Progress (run, level, step, tile) reaches the GUI
through queued Qt signals, throttled. Cancel sets the Event the engine checks every step, so the
run stops within one step; layers are added only after success, so a cancelled or failed run
leaves nothing half-made. A GPU out-of-memory error retries the run tiled and says so.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, ProgressBar, PushButton, SpinBox

from ..run.inference import StepInfo
from ._devices import choose_tiling, is_out_of_memory, list_devices
from ._layers import layer_input, output_layers
from ._models import CATALOG, follow_catalog
from ._settings import plugin_setting
from ._spacing import from_grid, grid_plan, to_grid
from ._workers import Job, Throttle

if TYPE_CHECKING:
    import napari


def image_layer_choices(viewer: Any) -> list[tuple[str, Any]]:
    """(name, layer) of every Image layer of ``viewer``."""
    from napari.layers import Image

    return [(ly.name, ly) for ly in viewer.layers if isinstance(ly, Image)]


class SegmentWidget(Container):
    """Segment an Image layer with an OctreeNCA model (dock widget)."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=lambda _w: image_layer_choices(self.viewer))
        self.model = ComboBox(label="model", choices=lambda _w: CATALOG.names())
        self.model_file = FileEdit(label="model file", mode="r", filter="*.safetensors")
        self.device = ComboBox(label="device", choices=[(d.label, d.id) for d in list_devices()])
        self.precision = ComboBox(label="precision", choices=["float32", "bfloat16"],
                                  value=plugin_setting("precision", "float32"))
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=int(plugin_setting("seed", 0)))
        self.runs = SpinBox(label="ensemble runs", min=1, max=64, value=int(plugin_setting("runs", 1)))
        self.level = SpinBox(label="pyramid level", min=0, max=0, value=0,
                             tooltip="multiscale inputs: which resolution level to segment (0 = finest)")
        self.tiling = ComboBox(label="tiling", choices=["auto", "whole", "tiled"], value="auto")
        self.plan = Label(label="memory", value="")
        self.probability = CheckBox(text="probability layer", value=bool(plugin_setting("probability", False)))
        self.uncertainty = CheckBox(text="uncertainty layer (ensemble spread)", value=True)
        self.run_button = PushButton(text="Segment")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.bar_level = ProgressBar(label="level", min=0, max=1, value=0)
        self.bar_step = ProgressBar(label="step", min=0, max=1, value=0)
        self.bar_tile = ProgressBar(label="tile", min=0, max=1, value=0, visible=False)
        self.status = Label(label="status", value="ready")
        self.quality = Label(label="quality", value="", tooltip="how far to trust the result: the spread "
                             "between the ensemble runs (needs 2 or more runs), calibrated per model")
        self.extend([
            self.image, self.model, self.model_file, self.device, self.precision, self.seed, self.runs,
            self.level, self.tiling, self.plan, self.probability, self.uncertainty, self.run_button,
            self.cancel_button, self.bar_level, self.bar_step, self.bar_tile, self.status, self.quality,
        ])
        _fixed_width(self.status, self.plan, self.quality)
        self.job: Job | None = None
        self.last_error: BaseException | None = None
        self.notices: list[str] = []
        self._throttle = Throttle(0.1)
        self.model_file.changed.connect(self._add_model_file)
        self.image.changed.connect(self._suggest_model)
        for w in (self.image, self.model, self.device, self.precision, self.runs, self.level, self.tiling):
            w.changed.connect(self._update_plan)
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.request_cancel)
        follow_catalog(self, self._models_changed)
        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed, events.reordered):
            ev.connect(self._layers_changed)
        self._layers_changed()
        default_model = plugin_setting("model", "")
        if default_model in CATALOG.names():
            self.model.value = default_model
        self._update_plan()

    # -- choices --------------------------------------------------------------------------------
    def _layers_changed(self, *_: Any) -> None:
        self.image.reset_choices()
        self._suggest_model()

    def _models_changed(self) -> None:
        self.model.reset_choices()

    def _suggest_model(self, *_: Any) -> None:
        """Sample data names its bundled model in the layer metadata: pre-select it."""
        layer = self.image.value
        name = ((getattr(layer, "metadata", None) or {}).get("octreenca") or {}).get("model")
        if name and name in CATALOG.names():
            self.model.value = name

    def _add_model_file(self, path: Any) -> None:
        if not path or not str(path).endswith(".safetensors"):
            return
        try:
            name = CATALOG.add(path)
        except Exception as exc:
            from napari.utils.notifications import show_error

            show_error(f"cannot open model {path}: {exc}")
            return
        self.model.value = name

    def _update_plan(self, *_: Any) -> None:
        """Show the memory estimate and the tiling decision before the run."""
        layer = self.image.value
        if layer is None or not self.model.value:
            self.plan.value = "choose an image and a model"
            return
        try:
            if layer.multiscale:
                self.level.max = len(layer.data) - 1
            src = layer_input(layer, self.level.value)
            cfg = _config_of(self.model.value)
            grid = grid_plan(cfg, tuple(src.array.shape), src.axes, _level_scale(src), src.metadata)
            choice = choose_tiling(cfg, grid.grid_shape, self.device.value, dtype=self.precision.value,
                                   runs=self.runs.value, mode=self.tiling.value)
            at = f" at the model's spacing ({'x'.join(map(str, grid.grid_shape))})" if grid.resampled else ""
            self.plan.value = choice.text + at
        except Exception as exc:  # the estimate is advisory; show why it failed
            self.plan.value = f"no estimate: {exc}"

    # -- running --------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The current choices (what the run record stores)."""
        layer = self.image.value
        return {
            "image": getattr(layer, "name", None), "model": self.model.value,
            "model_file": str(CATALOG.path(self.model.value)) if self.model.value else None,
            "device": self.device.value, "precision": self.precision.value, "seed": self.seed.value,
            "runs": self.runs.value, "pyramid_level": self.level.value, "tiling": self.tiling.value,
        }

    def start(self, *_: Any) -> Job | None:
        """Start a segmentation in a worker; returns the job (None when nothing to do)."""
        from napari.utils.notifications import show_error

        if self.job is not None and self.job.running:
            return self.job
        layer = self.image.value
        if layer is None:
            show_error("choose an Image layer to segment (File > Open Sample has examples)")
            return None
        if not self.model.value:
            show_error("choose a model, or open a .safetensors model file")
            return None
        settings = self.settings()
        src = layer_input(layer, self.level.value)
        want_prob, want_unc = self.probability.value, self.uncertainty.value
        self.last_error = None

        def work(job: Job) -> tuple[Any, dict[str, Any]]:
            return _run(job, src, settings)

        def done(result: tuple[Any, dict[str, Any]]) -> None:
            seg, record = result
            for data, kwargs, kind in output_layers(seg, src, record=record, probability=want_prob,
                                                    uncertainty=want_unc and seg.spread is not None):
                self.viewer._add_layer_from_data(data, kwargs, kind)
            self.status.value = f"done in {record['timings']['seconds']:.1f} s" + (
                " (tiled)" if record.get("tiled") else "")
            self.quality.value = seg.verdict

        self.job = Job(work, on_done=done, on_finished=self._finished, on_cancelled=self._cancelled,
                       on_error=self._errored, what="segmentation")
        self.job.relay.progress.connect(self._progress)
        self.job.relay.notice.connect(self.notices.append)  # also shown as a napari warning
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = "starting"
        self.bar_tile.visible = False
        self.job.start()
        return self.job

    def request_cancel(self, *_: Any) -> None:
        if self.job is not None and self.job.running:
            self.job.request_cancel()
            self.status.value = "cancelling"

    def _progress(self, p: dict[str, Any]) -> None:
        if "tiles" in p:
            self.bar_tile.visible = True
            self.bar_tile.max, self.bar_tile.value = p["tiles"], p["tile"]
            self.bar_tile.label = f"tile ({p.get('stage', '')} level {p.get('level')})"
            self.status.value = f"tile {p['tile']}/{p['tiles']} of {p.get('stage')} level {p.get('level')}"
            return
        levels = p["levels"]
        self.bar_level.max = levels * p["runs"]
        self.bar_level.value = p["run"] * levels + (levels - p["level"])
        self.bar_step.max = max(1, p["level_steps"])
        self.bar_step.value = p["step"] + 1
        run = f"run {p['run'] + 1}/{p['runs']}, " if p["runs"] > 1 else ""
        self.status.value = f"{run}level {p['level']} step {p['step'] + 1}/{p['level_steps']} ({p['done']}/{p['total']})"

    def _cancelled(self) -> None:
        self.status.value = "cancelled"

    def _errored(self, exc: BaseException) -> None:
        self.last_error = exc
        self.status.value = f"failed: {exc}"

    def _finished(self) -> None:
        self.run_button.enabled = True
        self.cancel_button.enabled = False


def _fixed_width(*labels: Label) -> None:
    """Labels whose text changes while a run goes on must not resize the dock: a resize redraws
    the canvas, which under software OpenGL takes the CPU the run needs."""
    from qtpy.QtWidgets import QSizePolicy

    for label in labels:
        native = label.native
        native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        native.setMinimumWidth(240)
        native.setWordWrap(False)


def _level_scale(src: Any) -> tuple[float, ...]:
    """World size of a pixel of the pyramid level being segmented (the input spacing)."""
    f = [n0 / n for n0, n in zip(src.level_shapes[0], src.spatial_shape)]
    return tuple(s * fi for s, fi in zip(src.scale, f))


def _config_of(name: str) -> Any:
    from ..nca.modelfile import read_config

    return read_config(CATALOG.path(name))


def _run(job: Job, src: Any, settings: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The worker-thread part: load, choose tiling, segment (retry tiled on out-of-memory)."""
    import numpy as np
    import torch

    from ..run.inference import segment

    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    device = settings["device"]
    model = CATALOG.load(settings["model"], device)
    array = src.array
    throttle = Throttle(0.1)
    levels = model.config.levels

    def on_step(info: StepInfo) -> None:
        if throttle(force=info.step == info.level_steps - 1):
            job.relay.progress.emit({"run": info.run, "runs": info.runs, "level": info.level, "levels": levels,
                                     "step": info.step, "level_steps": info.level_steps, "done": info.done,
                                     "total": info.total})

    def on_tile(p: dict[str, Any]) -> None:
        job.relay.progress.emit(dict(p))

    cfg = model.config
    grid = grid_plan(cfg, tuple(array.shape), src.axes, _level_scale(src), src.metadata)
    common = dict(axes=grid.axes, dtype=settings["precision"], seed=settings["seed"], runs=settings["runs"],
                  cancel=job.cancel)
    choice = choose_tiling(cfg, grid.grid_shape, device, dtype=settings["precision"],
                           runs=settings["runs"], mode=settings["tiling"])
    load_s = time.perf_counter() - t0
    retried = False
    if grid.affine is not None:
        # A NIfTI volume for a fixed-spacing 3D model: reoriented to RAS+ and resampled there.
        from ..run.resample import segment_at_model_spacing

        work = np.asarray(array)
    else:
        work = to_grid(array, cfg, grid) if grid.spacing is not None else array

    def tiled(tile: int | None) -> Any:
        from ..run.tiling import segment_tiled

        return from_grid(segment_tiled(model, work, tile=tile, device=device, callback=on_tile, **common), grid)

    if choice.tiled and grid.affine is None:
        seg = tiled(choice.tile)
    else:
        try:
            if grid.affine is not None:
                seg = segment_at_model_spacing(model, work, device=device, callback=on_step, affine=grid.affine,
                                               **common)
            else:
                if hasattr(work, "compute") or not isinstance(work, np.ndarray):
                    work = np.asarray(work)
                seg = from_grid(segment(model, work, device=device, callback=on_step, **common), grid)
        except Exception as exc:
            if not is_out_of_memory(exc) or grid.affine is not None:
                raise
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            smaller = choose_tiling(cfg, grid.grid_shape, device, dtype=settings["precision"],
                                    runs=settings["runs"], mode="tiled")
            job.relay.notice.emit(f"{device} ran out of memory for the whole image; retrying tiled "
                                  f"({smaller.tile}-cell tiles)")
            retried = True
            seg = tiled(smaller.tile)
    seconds = time.perf_counter() - t0
    record = {
        "model": settings["model"], "model_file": settings["model_file"], "model_config": model.config.name,
        "settings": settings, "seed": settings["seed"], "seeds": list(seg.seeds), "engine": dict(seg.record),
        "tiled": bool(seg.record.get("tiled", False)), "retried_tiled_after_oom": retried,
        "quality": seg.quality, "verdict": seg.verdict,
        "plan": choice.text, "class_names": list(seg.class_names),
        "timings": {"started": started, "load_s": round(load_s, 3), "segment_s": round(seg.seconds, 3),
                    "seconds": round(seconds, 3)},
    }
    return seg, record


__all__ = ["SegmentWidget", "image_layer_choices"]
