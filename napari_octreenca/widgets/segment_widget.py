"""The Segment widget: pick an image, a model, a device; segment in a worker with cancel.

The run happens in a napari worker thread. Progress (run, level, step, tile) reaches the GUI
through queued Qt signals, throttled. Cancel sets the Event the engine checks every step, so the
run stops within one step; layers are added only after success, so a cancelled or failed run
leaves nothing half-made. A GPU out-of-memory error retries the run tiled and says so.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, ProgressBar, PushButton, SpinBox
from qtpy.QtWidgets import QSizePolicy

from ..nca.errors import ModelFileError
from ..run.baselines import BASELINE_MODELS, BaselineAdvice, model_baseline_advice
from ..run.execute import execute
from ..run.inference import StepInfo
from ..run.planner import RunOptions, plan_run
from ._devices import list_devices
from ._layers import layer_input, output_layers
from ._models import CATALOG, follow_catalog
from ._settings import plugin_setting
from ._workers import Job, Throttle, warm_up_in_background, warm_up_layers
from .qt_helpers import DockContainer, ElidedLabel, advanced_group, on_dock_closed
from .shared import config_of as _config_of
from .shared import free_prefix, image_layer_choices, place_layers

if TYPE_CHECKING:
    import napari


class SegmentWidget(DockContainer):
    """Segment an Image layer with an OctreeNCA model (dock widget).

    A few main controls (image, model, device, Segment/Cancel, progress); precision, seed,
    ensemble runs, output layers, pyramid level and tiling are folded under "advanced settings".
    A new run's layers replace the previous run's unless "keep previous results" is ticked.
    The classical baselines are listed after the models; when the chosen model's file says a
    baseline did better on held-out data, a notice offers a one-click switch to it.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=lambda _w: image_layer_choices(self.viewer))
        self.model = ComboBox(label="model", choices=lambda _w: CATALOG.names() + list(BASELINE_MODELS))
        self.advice_text = Label(value="")
        self.advice_text.native.setWordWrap(True)
        # Wraps to the dock's width instead of widening the dock.
        self.advice_text.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.use_baseline = PushButton(text="use the baseline")
        self.advice = Container(widgets=[self.advice_text, self.use_baseline], labels=False, visible=False)
        self.advice.margins = (0, 0, 0, 0)
        self.advice_shown: BaselineAdvice | None = None
        self.model_file = FileEdit(label="model file", mode="r", filter="*.safetensors")
        self.device = ComboBox(label="device", choices=[(d.label, d.id) for d in list_devices()])
        self.precision = ComboBox(
            label="precision", choices=["float32", "bfloat16"], value=plugin_setting("precision", "float32")
        )
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=int(plugin_setting("seed", 0)))
        self.runs = SpinBox(label="ensemble runs", min=1, max=64, value=int(plugin_setting("runs", 1)))
        self.level = SpinBox(
            label="pyramid level",
            min=0,
            max=0,
            value=0,
            tooltip="multiscale inputs: which resolution level to segment (0 = finest)",
        )
        self.tiling = ComboBox(label="tiling", choices=["auto", "whole", "tiled"], value="auto")
        self.plan = ElidedLabel(label="memory", value="")
        self.probability = CheckBox(text="probability layer", value=bool(plugin_setting("probability", False)))
        self.uncertainty = CheckBox(
            text="uncertainty layer",
            value=False,
            enabled=False,
            tooltip="the spread of the ensemble runs (needs 2 or more runs)",
        )
        self.keep = CheckBox(
            text="keep previous results", value=False, tooltip="off: a new run's layers replace the previous run's"
        )
        self.run_button = PushButton(text="Segment")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.bar_level = ProgressBar(label="level", min=0, max=1, value=0)
        self.bar_step = ProgressBar(label="step", min=0, max=1, value=0)
        self.bar_tile = ProgressBar(label="tile", min=0, max=1, value=0, visible=False)
        self.status = ElidedLabel(label="status", value="ready")
        self.quality = ElidedLabel(label="quality", value="")
        self.quality.tooltip = (
            "how far to trust the result: the spread between the ensemble runs (needs 2 or "
            "more runs) and, where the model's calibration names one, the agreement with a classical "
            "baseline; calibrated per model"
        )
        self.show_advanced, self.advanced = advanced_group(
            [
                self.model_file,
                self.precision,
                self.seed,
                self.runs,
                self.uncertainty,
                self.probability,
                self.level,
                self.tiling,
                self.keep,
            ]
        )
        self.extend(
            [
                self.image,
                self.model,
                self.advice,
                self.device,
                self.plan,
                self.show_advanced,
                self.advanced,
                self.run_button,
                self.cancel_button,
                self.bar_level,
                self.bar_step,
                self.bar_tile,
                self.status,
                self.quality,
            ]
        )
        self.result_layers: list[Any] = []
        self.job: Job | None = None
        self.last_error: BaseException | None = None
        self.notices: list[str] = []
        self._throttle = Throttle(0.1)
        self.model_file.changed.connect(self._add_model_file)
        self.model.changed.connect(self._update_advice)
        self.use_baseline.changed.connect(self._switch_to_baseline)
        self.image.changed.connect(self._suggest_model)
        for w in (self.image, self.model, self.device, self.precision, self.runs, self.level, self.tiling):
            w.changed.connect(self._update_plan)
        self.runs.changed.connect(self._runs_changed)
        self._runs_changed()
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.request_cancel)
        on_dock_closed(self, self.request_cancel)
        follow_catalog(self, self._models_changed)
        warm_up_in_background()  # the first run then does not stall the GUI loading kernels
        warm_up_layers(self.viewer, self.native)  # and napari shows its first layers without a stall
        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed, events.reordered):
            ev.connect(self._layers_changed)
        self._layers_changed()
        default_model = plugin_setting("model", "")
        if default_model in CATALOG.names():
            self.model.value = default_model
        self._update_plan()
        self._update_advice()
        self.end_layout()

    # -- choices --------------------------------------------------------------------------------
    def _layers_changed(self, *_: Any) -> None:
        self.image.reset_choices()
        self._suggest_model()

    def _models_changed(self) -> None:
        self.model.reset_choices()

    def _runs_changed(self, *_: Any) -> None:
        """An uncertainty layer is the spread of an ensemble: offered (and ticked) from 2 runs."""
        many = self.runs.value > 1
        self.uncertainty.enabled = many
        self.uncertainty.value = many

    def _suggest_model(self, *_: Any) -> None:
        """Sample data names its bundled model in the layer metadata: pre-select it."""
        layer = self.image.value
        name = ((getattr(layer, "metadata", None) or {}).get("octreenca") or {}).get("model")
        if name and name in CATALOG.names():
            self.model.value = name

    def _update_advice(self, *_: Any) -> None:
        """Show the notice when the chosen model's held-out comparison says a baseline did better."""
        name = self.model.value
        advice = None
        if name and name not in BASELINE_MODELS:
            try:
                advice = model_baseline_advice(CATALOG.path(name))
            except ModelFileError:  # not a model any more: the plan line and the run report it
                advice = None
        self.advice_shown = advice
        self.advice.visible = advice is not None
        if advice is not None:
            self.advice_text.value = f"{advice.sentence}: use it?"
            self.advice_text.tooltip = advice.details
            self.use_baseline.text = f"use {advice.baseline}"

    def _switch_to_baseline(self, *_: Any) -> None:
        if self.advice_shown is not None:
            self.model.value = self.advice_shown.baseline

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
        if self.model.value in BASELINE_MODELS:
            kind = BASELINE_MODELS[self.model.value]
            self.plan.value = f"classical baseline (no NCA, no quality estimate): {kind['input']}"
            return
        try:
            if layer.multiscale:
                self.level.max = len(layer.data) - 1
            src = layer_input(layer, self.level.value)
            cfg = _config_of(self.model.value)
            options = RunOptions(
                device=self.device.value, dtype=self.precision.value, runs=self.runs.value, tiling=self.tiling.value
            )
            self.plan.value = plan_run(cfg, src.geometry(), options).text
        except Exception as exc:  # the estimate is advisory; show why it failed
            self.plan.value = f"no estimate: {exc}"

    # -- running --------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The current choices (what the run record stores)."""
        layer = self.image.value
        return {
            "image": getattr(layer, "name", None),
            "model": self.model.value,
            "model_file": (
                str(CATALOG.path(self.model.value))
                if self.model.value and self.model.value not in BASELINE_MODELS
                else None
            ),
            "device": self.device.value,
            "precision": self.precision.value,
            "seed": self.seed.value,
            "runs": self.runs.value,
            "pyramid_level": self.level.value,
            "tiling": self.tiling.value,
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

        def work(job: Job) -> tuple[Any, dict[str, Any], list[Any]]:
            seg, record = _run(job, src, settings)
            # The layers' data (probabilities, pyramids) is made here, off the GUI thread.
            uncertainty = want_unc and seg.spread is not None
            layers = output_layers(seg, src, record=record, probability=want_prob, uncertainty=uncertainty)
            return seg, record, layers

        def done(result: tuple[Any, dict[str, Any], list[Any]]) -> None:
            seg, record, layers = result
            replace = [] if self.keep.value else list(self.result_layers)
            # Kept runs' layers keep their names; this run's say which run it is (not napari's [1]).
            ends = [kw["name"].removeprefix(src.name) for _, kw, _ in layers]
            prefix = free_prefix(self.viewer, src.name, ends, ignore=replace)
            layers = [(d, {**kw, "name": prefix + end}, k) for (d, kw, k), end in zip(layers, ends)]
            job = self.job
            if job is not None:
                job.hold()  # the run ends when its layers are all shown
            self.result_layers = place_layers(
                self.viewer, layers, replace=replace, owner=self.native, on_placed=job.release if job else None
            )
            self.status.value = f"done in {record['timings']['seconds']:.1f} s" + (
                " (tiled)" if record.get("tiled") else ""
            )
            self.quality.value = "classical baseline: no quality estimate" if record.get("baseline") else seg.verdict

        self.job = Job(
            work,
            on_done=done,
            on_finished=self._finished,
            on_cancelled=self._cancelled,
            on_error=self._errored,
            what="segmentation",
        )
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
        if "frames" in p:  # derived input channels, before the first step
            self.bar_step.max, self.bar_step.value = max(1, p["frames"]), p["frame"]
            self.status.value = f"computing {p.get('stage', 'input')}: frame {p['frame']}/{p['frames']}"
            return
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
        self.status.value = (
            f"{run}level {p['level']} step {p['step'] + 1}/{p['level_steps']} ({p['done']}/{p['total']})"
        )

    def _cancelled(self) -> None:
        self.status.value = "cancelled"

    def _errored(self, exc: BaseException) -> None:
        self.last_error = exc
        self.status.value = f"failed: {exc}"

    def _finished(self) -> None:
        self.run_button.enabled = True
        self.cancel_button.enabled = False


def _run(job: Job, src: Any, settings: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The worker-thread part: load the model, plan the run (the CLI's planner), segment."""
    t0 = time.perf_counter()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    if settings["model"] in BASELINE_MODELS:
        return _run_baseline(src, settings, started, t0)
    device = settings["device"]
    model = CATALOG.load(settings["model"], device)
    throttle = Throttle(0.1)
    levels = model.config.levels

    def on_step(info: StepInfo) -> None:
        if throttle(force=info.step == info.level_steps - 1):
            job.relay.progress.emit(
                {
                    "run": info.run,
                    "runs": info.runs,
                    "level": info.level,
                    "levels": levels,
                    "step": info.step,
                    "level_steps": info.level_steps,
                    "done": info.done,
                    "total": info.total,
                }
            )

    def on_tile(p: dict[str, Any]) -> None:
        job.relay.progress.emit(dict(p))

    options = RunOptions(
        device=device,
        dtype=settings["precision"],
        seed=settings["seed"],
        runs=settings["runs"],
        tiling=settings["tiling"],
    )
    plan = plan_run(model.config, src.geometry(), options)
    load_s = time.perf_counter() - t0
    seg = execute(
        model,
        plan,
        src.array,
        callback=on_step,
        tile_callback=on_tile,
        cancel=job.cancel,
        notice=job.relay.notice.emit,
        prepare_callback=job.prepare_callback(throttle),
    )
    seconds = time.perf_counter() - t0
    retried = bool(seg.record.get("retried_tiled_after_oom", False))
    record = {
        "model": settings["model"],
        "model_file": settings["model_file"],
        "model_config": model.config.name,
        "settings": settings,
        "seed": settings["seed"],
        "seeds": list(seg.seeds),
        "engine": dict(seg.record),
        "tiled": bool(seg.record.get("tiled", False)),
        "retried_tiled_after_oom": retried,
        "quality": seg.quality,
        "verdict": seg.verdict,
        "plan": plan.text,
        "class_names": list(seg.class_names),
        "timings": {
            "started": started,
            "load_s": round(load_s, 3),
            "segment_s": round(seg.seconds, 3),
            "seconds": round(seconds, 3),
        },
    }
    return seg, record


def _run_baseline(src: Any, settings: dict[str, Any], started: str, t0: float) -> tuple[Any, dict[str, Any]]:
    """The worker-thread part for a classical baseline: the chosen level of the layer, its spacing."""
    import numpy as np

    name = settings["model"]
    array = np.asarray(src.array)
    # A plain 3D grey layer is a volume; RGB layers come with axes "YXC" (layer_input).
    axes = src.axes or ("ZYX" if array.ndim == 3 else "YX")
    from ..run.inference import baseline_segmentation

    seg = baseline_segmentation(name, array, axes, src.level_scale)
    record = {
        "model": name,
        "model_file": None,
        "baseline": name,
        "settings": settings,
        "quality": None,
        "verdict": None,
        "class_names": list(seg.class_names),
        "timings": {"started": started, "seconds": round(time.perf_counter() - t0, 3)},
    }
    return seg, record


__all__ = ["SegmentWidget", "image_layer_choices"]
