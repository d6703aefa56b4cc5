"""The Train widget: train an OctreeNCA from Image + Labels layers, in a worker.

Pairs of (image, labels) layers (2D, 3D or video; several allowed) train a model that starts
from a preset or from a model in the list. The worker runs :func:`run.training.train`; the
GUI shows a live loss curve and, every few iterations, a preview of the current (EMA) model on a
chosen slice; pause/resume and cancel work at any time. The result is saved as a safe
``.safetensors`` model file and added to the model list of the segment and inspector widgets.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, FileEdit, FloatSpinBox, ProgressBar, PushButton, SpinBox

from ..nca.config import PRESETS, ModelConfig, preset
from ._devices import list_devices
from ._models import CATALOG, follow_catalog
from ._workers import Job, Throttle, warm_up_in_background, warm_up_layers
from .qt_helpers import DockContainer, ElidedLabel, advanced_group, on_dock_closed
from .shared import image_layer_choices, labels_layer_choices

if TYPE_CHECKING:
    import napari

PRESET_PREFIX = "preset: "
#: Where a trained model goes unless the user picks a file: ``trained.safetensors``, then
#: ``trained-2.safetensors``... (never overwritten without asking).
DEFAULT_OUTPUT = Path.home() / "octreenca_models" / "trained.safetensors"


def next_free_path(path: Path) -> Path:
    """``path`` if no file is there, else ``<stem>-2<suffix>``, ``<stem>-3<suffix>``...: the
    first free one (``trained-2`` is followed by ``trained-3``, not ``trained-2-2``)."""
    import re

    path = Path(path)
    if not path.exists():
        return path
    m = re.fullmatch(r"(.*?)-(\d+)", path.stem)
    stem, k = (m.group(1), int(m.group(2)) + 1) if m else (path.stem, 2)
    while (candidate := path.with_name(f"{stem}-{k}{path.suffix}")).exists():
        k += 1
    return candidate


def layer_axes(layer: Any) -> str:
    """Axes of an Image layer's data: from the reader's metadata, else from its shape."""
    axes = ((layer.metadata or {}).get("octreenca") or {}).get("axes")
    if axes:
        return str(axes)
    nd = layer.data.ndim if not layer.multiscale else layer.data[0].ndim
    if layer.rgb:
        return {3: "YXC", 4: "TYXC"}.get(nd, "ZYXC"[-nd:])
    return {2: "YX", 3: "ZYX"}.get(nd, "TZYX"[-nd:])


def start_config(start: str, axes: str, classes: int, class_names: list[str] | None) -> ModelConfig | str:
    """The model config for a preset start (channels and classes from the data), or the model name."""
    if not start.startswith(PRESET_PREFIX):
        return start
    name = start[len(PRESET_PREFIX) :]
    cfg = PRESETS[name]
    spatial = axes.replace("C", "")
    if len(spatial) != cfg.spatial_dims:
        raise ValueError(
            f"preset {name!r} is {cfg.spatial_dims}D but the image axes are {axes!r}; choose "
            f"{'pathology (2D)' if len(spatial) == 2 else 'radiology (3D) or surgery (video)'}"
        )
    channels = 3 if "C" in axes else 1
    names = tuple(class_names) if class_names and len(class_names) == classes else None
    changes: dict[str, Any] = {"input_channels": channels, "output_channels": classes}
    if names:
        changes["class_names"] = names
    if channels != cfg.input_channels and cfg.normalization.mode == "fixed":
        from ..nca.config import Normalization

        changes["normalization"] = Normalization(mode="percentile")
    return preset(name, **changes)


def crop_for(config: ModelConfig, edge: int, depth: int) -> tuple[int, ...]:
    """Training crop in the network's axis order: ``edge`` on Y and X, ``depth`` on Z or T."""
    return tuple(edge if a in "YX" else depth for a in config.axes)


class TrainingWidget(DockContainer):
    """Train an OctreeNCA model from layers (dock widget).

    Main controls: image, labels, start model, iterations, output file, Train/Pause/Cancel;
    pairs, device, batch, crops, learning rate and the preview are folded under "advanced".
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=lambda _w: image_layer_choices(self.viewer))
        self.labels = ComboBox(label="labels", choices=lambda _w: labels_layer_choices(self.viewer))
        self.add_pair = PushButton(text="Add pair")
        self.clear_pairs = PushButton(text="Clear pairs")
        self.pairs_label = ElidedLabel(label="pairs", value="none (the image/labels above are used)")
        self.start_from = ComboBox(label="start from", choices=lambda _w: self._start_choices())
        self.device = ComboBox(label="device", choices=[(d.label, d.id) for d in list_devices()])
        self.iterations = SpinBox(label="iterations", min=1, max=1_000_000, value=300)
        self.batch = SpinBox(label="batch size", min=1, max=64, value=2)
        self.crop = SpinBox(label="crop (Y, X)", min=8, max=4096, value=96)
        self.depth = SpinBox(label="crop (Z or T)", min=1, max=512, value=16)
        self.lr = FloatSpinBox(label="learning rate", min=1e-5, max=1.0, step=1e-4, value=1.6e-3)
        self.preview_slice = SpinBox(
            label="preview slice", min=0, max=0, value=0, tooltip="3D/video: index on the first axis; 2D: unused"
        )
        self.preview_every = SpinBox(label="preview every", min=1, max=10000, value=25)
        self.output = FileEdit(
            label="save as", mode="w", filter="*.safetensors", value=str(next_free_path(DEFAULT_OUTPUT))
        )
        self.run_button = PushButton(text="Train")
        self.pause_button = PushButton(text="Pause", enabled=False)
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.bar = ProgressBar(label="iterations", min=0, max=1, value=0)
        self.status = ElidedLabel(label="status", value="ready")
        self.show_advanced, self.advanced = advanced_group(
            [
                self.add_pair,
                self.clear_pairs,
                self.pairs_label,
                self.device,
                self.batch,
                self.crop,
                self.depth,
                self.lr,
                self.preview_slice,
                self.preview_every,
            ]
        )
        self.extend(
            [
                self.image,
                self.labels,
                self.start_from,
                self.iterations,
                self.output,
                self.show_advanced,
                self.advanced,
                self.run_button,
                self.pause_button,
                self.cancel_button,
                self.bar,
                self.status,
            ]
        )
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.2), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(160)
        self.loss_axes = self.figure.add_subplot(111)
        self.body.layout().addWidget(self.canvas)
        self.pairs: list[tuple[Any, Any]] = []
        self.history: list[dict[str, float]] = []
        self.job: Job | None = None
        self.saved: Path | None = None
        self.preview_layer: Any = None
        self.add_pair.changed.connect(self._add_pair)
        self.clear_pairs.changed.connect(self._clear_pairs)
        self.image.changed.connect(self._image_changed)
        self.run_button.changed.connect(self.start)
        self.pause_button.changed.connect(self.toggle_pause)
        self.cancel_button.changed.connect(self.request_cancel)
        on_dock_closed(self, self.request_cancel)
        follow_catalog(self, self.start_from.reset_choices)
        warm_up_in_background(training=True)  # the first training run then does not stall the GUI
        warm_up_layers(self.viewer, self.native)  # and napari shows its first layers without a stall
        ev = self.viewer.layers.events
        for e in (ev.inserted, ev.removed, ev.reordered):
            e.connect(self._layers_changed)
        self._layers_changed()
        self.end_layout()

    # -- choices ----------------------------------------------------------------------------------
    @staticmethod
    def _start_choices() -> list[str]:
        return [PRESET_PREFIX + p for p in PRESETS] + CATALOG.names()

    def _layers_changed(self, *_: Any) -> None:
        self.image.reset_choices()
        self.labels.reset_choices()
        self.pairs = [(i, lb) for i, lb in self.pairs if i in self.viewer.layers and lb in self.viewer.layers]
        self._show_pairs()
        self._image_changed()

    def _image_changed(self, *_: Any) -> None:
        layer = self.image.value
        if layer is None or layer is getattr(self, "_last_image", None):
            return
        self._last_image = layer
        axes = layer_axes(layer)
        shape = layer.data.shape if not layer.multiscale else layer.data[0].shape
        spatial = [n for n, a in zip(shape, axes) if a != "C"]
        volume = len(spatial) == 3
        self.preview_slice.max = max(0, spatial[0] - 1) if volume else 0
        self.preview_slice.value = self.preview_slice.max // 2
        # Z/T fields mean nothing for a 2D image: hide them.
        self.depth.visible = volume
        self.preview_slice.visible = volume
        want = {2: "pathology", 3: "surgery" if "T" in axes else "radiology"}.get(len(spatial))
        if want and self.start_from.value and str(self.start_from.value).startswith(PRESET_PREFIX):
            self.start_from.value = PRESET_PREFIX + want

    def _add_pair(self, *_: Any) -> None:
        img, lab = self.image.value, self.labels.value
        if img is None or lab is None:
            from napari.utils.notifications import show_error

            show_error("choose an Image layer and a Labels layer to pair")
            return
        if (img, lab) not in self.pairs:
            self.pairs.append((img, lab))
        self._show_pairs()

    def _clear_pairs(self, *_: Any) -> None:
        self.pairs = []
        self._show_pairs()

    def _show_pairs(self) -> None:
        self.pairs_label.value = (
            "; ".join(f"{i.name} + {lb.name}" for i, lb in self.pairs) or "none (the image/labels above are used)"
        )

    def training_pairs(self) -> list[tuple[Any, Any]]:
        """The pairs to train on: the added ones, else the current image + labels choice."""
        if self.pairs:
            return list(self.pairs)
        if self.image.value is None or self.labels.value is None:
            return []
        return [(self.image.value, self.labels.value)]

    # -- running ----------------------------------------------------------------------------------
    def start(self, *_: Any) -> Job | None:
        from napari.utils.notifications import show_error

        from ..run.training import TrainConfig, TrainPair

        if self.job is not None and self.job.running:
            return self.job
        pairs = self.training_pairs()
        if not pairs:
            show_error("choose an Image and a Labels layer (or add pairs) to train on")
            return None
        try:
            tpairs, axes, classes, names = [], None, 1, None
            for img, lab in pairs:
                a = layer_axes(img)
                data = np.asarray(img.data if not img.multiscale else img.data[0])
                labels = np.asarray(lab.data if not lab.multiscale else lab.data[0])
                if axes is not None and len(a.replace("C", "")) != len(axes.replace("C", "")):
                    raise ValueError("all pairs must have the same number of spatial axes")
                axes = axes or a
                classes = max(classes, int(labels.max()))
                feats = getattr(lab, "features", None)
                if names is None and feats is not None and "class" in getattr(feats, "columns", []):
                    names = [str(c) for c in list(feats["class"])[1:]]
                tpairs.append(TrainPair(data, labels.astype(np.int64), a))
            start = start_config(str(self.start_from.value), axes or "YX", classes, names)
        except Exception as exc:
            show_error(f"cannot train: {exc}")
            return None
        out = Path(str(self.output.value))
        if out.suffix != ".safetensors":
            out = out.with_suffix(".safetensors")
        if out.exists():  # never overwrite a model without asking: the next free name
            out = next_free_path(out)
            self.output.value = str(out)
        device = self.device.value
        iterations, every = self.iterations.value, self.preview_every.value
        crop_edge, depth, lr, batch = self.crop.value, self.depth.value, self.lr.value, self.batch.value
        preview_src = pairs[0][0]
        preview_data, preview_axes = tpairs[0].image, tpairs[0].axes
        centre = labelled_centre(tpairs[0].labels)
        preview_index = self.preview_slice.value
        if (
            centre is not None
            and tpairs[0].labels.ndim == 3
            and not tpairs[0].labels[min(preview_index, tpairs[0].labels.shape[0] - 1)].any()
        ):
            preview_index = centre[0]  # the chosen slice holds no labels: preview where they are
            self.preview_slice.value = preview_index
        self.history = []
        self.saved = None

        def work(job: Job) -> Any:
            from ..nca.modelfile import save_model
            from ..run.training import train

            model = CATALOG.load(start, device) if isinstance(start, str) else start
            mcfg = model.config if not isinstance(model, ModelConfig) else model
            cfg = TrainConfig(iterations=iterations, batch_size=batch, crop=crop_for(mcfg, crop_edge, depth), lr=lr)
            throttle = Throttle(0.2)

            def on_progress(p: Any) -> None:
                preview = None
                if p.model is not None and (p.iteration % every == 0 or p.iteration == p.iterations):
                    preview = _preview(p.model, preview_data, preview_axes, preview_index, crop_edge, centre)
                if preview is not None or throttle(force=p.iteration == p.iterations):
                    job.relay.progress.emit(
                        {
                            "iteration": p.iteration,
                            "iterations": p.iterations,
                            "loss": p.loss,
                            "dice": p.dice,
                            "seconds": p.seconds,
                            "preview": preview,
                        }
                    )

            result = train(model, tpairs, cfg, callback=on_progress, cancel=job.cancel, pause=job.pause, device=device)
            save_model(result.model, out)  # atomic: a cancelled/failed run leaves no half file
            return out, result

        def done(res: Any) -> None:
            path, result = res
            self.saved = Path(path)
            name = CATALOG.add(path)
            if Path(str(self.output.value)) == self.saved:  # the next training must not overwrite it
                self.output.value = str(next_free_path(self.saved))
            last = result.history[-1] if result.history else {}
            self.status.value = (
                f"saved {path.name} as model {name!r} (loss {last.get('loss', float('nan')):.3f}, "
                f"{result.seconds:.0f} s)"
            )

        self.job = Job(work, on_done=done, on_finished=self._finished, what="training")
        self.job.relay.progress.connect(lambda p: self._progress(p, preview_src))
        self.run_button.enabled = False
        self.pause_button.enabled = True
        self.cancel_button.enabled = True
        self.bar.max, self.bar.value = iterations, 0
        self.status.value = "starting"
        self.job.start()
        return self.job

    def toggle_pause(self, *_: Any) -> None:
        if self.job is None or not self.job.running:
            return
        if self.job.pause.is_set():
            self.job.pause.clear()
            self.pause_button.text = "Pause"
            self.status.value = "resumed"
        else:
            self.job.pause.set()
            self.pause_button.text = "Resume"
            self.status.value = "paused"

    def request_cancel(self, *_: Any) -> None:
        if self.job is not None and self.job.running:
            self.job.request_cancel()
            self.status.value = "cancelling"

    def _progress(self, p: dict[str, Any], source: Any) -> None:
        self.history.append({k: p[k] for k in ("iteration", "loss", "dice")})
        self.bar.value = p["iteration"]
        if not (self.job is not None and self.job.pause.is_set()):
            self.status.value = (
                f"iteration {p['iteration']}/{p['iterations']}: loss {p['loss']:.4f}, dice {p['dice']:.3f}"
            )
        ax = self.loss_axes
        ax.clear()
        its = [h["iteration"] for h in self.history]
        ax.plot(its, [h["loss"] for h in self.history], lw=1.0, label="loss")
        ax.plot(its, [h["dice"] for h in self.history], lw=1.0, label="dice")
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        self.canvas.draw_idle()
        if p.get("preview") is not None:
            self._show_preview(p["preview"], source)

    def _show_preview(self, preview: tuple[np.ndarray, tuple[int, ...]], source: Any) -> None:
        """Put the preview labels where they lie in the image (a slice or a crop)."""
        labels, offset = preview
        from ._layers import layer_input

        src = layer_input(source, 0)
        translate = tuple(t + o * s for t, o, s in zip(src.translate, offset, src.scale))
        if self.preview_layer is None or self.preview_layer not in self.viewer.layers:
            self.preview_layer = self.viewer.add_labels(
                labels, name="training preview", scale=src.scale, translate=translate, opacity=0.6
            )
        else:
            self.preview_layer.data = labels
            self.preview_layer.translate = translate

    def _finished(self) -> None:
        self.run_button.enabled = True
        self.pause_button.enabled = False
        self.pause_button.text = "Pause"
        self.cancel_button.enabled = False
        if self.job is not None and self.job.cancelled:
            self.status.value = "cancelled (no model saved)"
            self._remove_preview()

    def _remove_preview(self) -> None:
        """A cancelled training leaves no preview of a model that does not exist."""
        if self.preview_layer is not None and self.preview_layer in self.viewer.layers:
            self.viewer.layers.remove(self.preview_layer)
        self.preview_layer = None


def labelled_centre(labels: np.ndarray) -> tuple[int, ...] | None:
    """A labelled cell near the middle of the labels (the one nearest their centroid), or None
    when nothing is labelled: where a preview shows whether the model finds the structure."""
    coords = np.argwhere(np.asarray(labels) > 0)
    if coords.size == 0:
        return None
    if len(coords) > 200_000:  # enough to find the middle
        coords = coords[:: len(coords) // 200_000]
    mid = coords.mean(axis=0)
    best = coords[np.argmin(((coords - mid) ** 2).sum(axis=1))]
    return tuple(int(c) for c in best)


def _preview(
    model: Any, image: np.ndarray, axes: str | None, index: int, edge: int, centre: tuple[int, ...] | None = None
) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """Labels of the current model on a window of the first pair: for 2D a crop around
    ``centre`` (a labelled cell; the image centre without one), for 3D and video a slab around
    slice ``index`` (kept small so previews stay quick)."""
    from ..run.inference import segment

    axes = axes or ("YXC" if image.ndim == 3 and image.shape[-1] == 3 else "ZYX"[-image.ndim :])
    spatial = [i for i, a in enumerate(axes) if a != "C"]
    slc: list[slice] = [slice(None)] * image.ndim
    offset = []
    win = 2 * edge
    for k, i in enumerate(spatial):
        n = image.shape[i]
        if len(spatial) == 3 and k == 0:
            a = max(0, min(n - 1, index) - 4)
            b = min(n, a + 9)
        else:
            c = centre[k] if centre is not None else n // 2
            a = max(0, min(n - win, c - win // 2))
            b = min(n, a + win)
        slc[i] = slice(a, b)
        offset.append(a)
    try:
        seg = segment(model, image[tuple(slc)], axes=axes, backend="torch")
    except Exception:
        return None  # a preview must never stop training
    labels = np.asarray(seg.labels)
    if len(spatial) == 3:
        k = min(max(0, index - offset[0]), labels.shape[0] - 1)
        labels = labels[k : k + 1]
        offset[0] += k
    return labels, tuple(offset)


__all__ = [
    "TrainingWidget",
    "start_config",
    "crop_for",
    "layer_axes",
    "labelled_centre",
    "next_free_path",
    "DEFAULT_OUTPUT",
]
