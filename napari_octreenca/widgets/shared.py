"""Qt-free helpers every dock widget uses: layer choices, model configs, pyramid-level geometry,
and adding result layers through napari's public API (replacing a previous run's layers).

Public on purpose: the segment, inspector and training widgets import these from here, never
from each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ._models import CATALOG

LayerData = tuple[Any, dict[str, Any], str]

#: Metadata key of the docks' short-lived warm-up layers (``_workers.warm_up_layers``): never offered.
WARM_UP_LAYER = "octreenca_warm_up"


def image_layer_choices(viewer: Any) -> list[tuple[str, Any]]:
    """(name, layer) of every Image layer of ``viewer``."""
    from napari.layers import Image

    return [(ly.name, ly) for ly in viewer.layers if isinstance(ly, Image) and WARM_UP_LAYER not in ly.metadata]


def labels_layer_choices(viewer: Any) -> list[tuple[str, Any]]:
    """(name, layer) of every Labels layer of ``viewer``."""
    from napari.layers import Labels

    return [(ly.name, ly) for ly in viewer.layers if isinstance(ly, Labels) and WARM_UP_LAYER not in ly.metadata]


def config_of(name: str) -> Any:
    """The model config of a catalog model (read from its file header, no weights loaded)."""
    from ..nca.modelfile import read_config

    return read_config(CATALOG.path(name))


def free_prefix(viewer: Any, base: str, suffixes: Iterable[str], ignore: Iterable[Any] = ()) -> str:
    """``base``, else ``base #2``, ``base #3``...: the first prefix with which none of the layer
    names ``prefix + suffix`` is taken (a kept run's layers keep their names; the next run's
    names say which run they are, instead of napari's ``[1]``). The ``ignore`` layers (about to
    be replaced) do not count."""
    skip = list(ignore)
    names = {ly.name for ly in viewer.layers if not any(ly is x for x in skip)}
    ends = list(suffixes)

    def free(p: str) -> bool:
        return not any(p + e in names for e in ends)

    if free(base):
        return base
    k = 2
    while not free(f"{base} #{k}"):
        k += 1
    return f"{base} #{k}"


def remove_layers(viewer: Any, layers: Iterable[Any]) -> int:
    """Remove those of ``layers`` still in the viewer; returns the index the first one had.

    Removed in one batch: napari's canvas runs a full ``gc.collect()`` after every removal (0.2-0.3 s
    each in a process holding torch and napari), once per batch instead."""
    gone = [layer for layer in dict.fromkeys(layers) if layer in viewer.layers]
    if not gone:
        return len(viewer.layers)
    index = min(viewer.layers.index(layer) for layer in gone)
    with viewer.layers.batched_update():
        for layer in gone:
            viewer.layers.remove(layer)
    return index


def _data_ndim(data: Any, kwargs: dict[str, Any]) -> int:
    first = data[0] if kwargs.get("multiscale") else data
    return len(first.shape) - (1 if kwargs.get("rgb") else 0)


def _reusable(layer: Any, data: Any, kwargs: dict[str, Any], kind: str, grow: bool = False) -> bool:
    """Can ``layer`` show this layer-data tuple by a change of data and geometry (same type, number
    of axes, RGB-ness and multiscale-ness)? With ``grow``, axes may be added in front of its own
    (a live layer shown without the level and step axes becomes the evolution layer)."""
    n = _data_ndim(data, kwargs)
    return (
        type(layer).__name__.lower() == kind
        and (layer.ndim == n or (grow and layer.ndim < n))
        and bool(getattr(layer, "rgb", False)) == bool(kwargs.get("rgb", False))
        and bool(layer.multiscale) == bool(kwargs.get("multiscale", False))
    )


#: What a new run changes on a reused layer; the look the user may have set (visibility,
#: colormap, opacity, blending) stays as it is.
_RUN_KEYS = ("scale", "translate", "contrast_limits", "axis_labels", "metadata", "features", "name")


def update_layer(layer: Any, data: Any, kwargs: dict[str, Any]) -> None:
    """Give a reused layer a new run's data; geometry only where it changed (each change makes
    napari recompute the viewer's dimensions and redraw)."""
    import numpy as np

    # napari refreshes only visible layers, and with them their extent: an invisible layer that
    # gains axes left the viewer's dimensions stale (an IndexError on its next change). Shown
    # for the change (within this turn: never painted so).
    grows = not layer.visible and layer.ndim != _data_ndim(data, kwargs)
    if grows:
        layer.visible = True
    layer.data = data
    for key in _RUN_KEYS:
        if key not in kwargs:
            continue
        if key in ("scale", "translate"):
            now = np.asarray(getattr(layer, key), float)
            new = np.asarray(kwargs[key], float)
            if now.shape != new.shape or not np.allclose(now, new):
                setattr(layer, key, kwargs[key])
        else:
            setattr(layer, key, kwargs[key])
    affine = np.asarray(kwargs.get("affine", np.eye(layer.ndim + 1)), float)
    now = np.asarray(layer.affine.affine_matrix, float)
    if now.shape != affine.shape or not np.allclose(now, affine):
        layer.affine = affine
    if grows:
        layer.visible = False


def place_layers(
    viewer: Any,
    layer_data: Sequence[LayerData],
    replace: Iterable[Any] = (),
    drop: Iterable[Any] = (),
    *,
    grow: Iterable[Any] = (),
    at: int | None = None,
    owner: Any = None,
    on_placed: Any = None,
) -> list[Any]:
    """Show a run's layer-data tuples in place of the previous run's layers ``replace``, without
    blocking the GUI for long; ``drop`` layers go away as well, unless reused. Returns the layers.

    - A ``replace`` or ``drop`` layer with the name of a new one (and its type and axes) is reused:
      only data, geometry, contrast limits and metadata change. napari makes no new layer and
      removes none (each removal costs a full ``gc.collect()``, each addition about 0.1 s).
    - The others are removed in one batch, and the new ones without a match added.
    - A ``grow`` layer may also take data with more axes (leading ones) in place.

    With ``owner`` (a QWidget) the layers are updated or added one per event-loop turn, from the
    GUI thread, by a timer that dies with ``owner``; without it, all at once. ``on_placed()``
    runs once every layer is shown.
    """
    from napari.layers import Layer

    candidates: dict[str, Any] = {}
    for ly in [*replace, *drop]:
        if ly in viewer.layers:
            candidates.setdefault(ly.name, ly)
    matched = [candidates.get(kw["name"]) for _, kw, _ in layer_data]
    growing = {id(ly) for ly in grow}
    matched = [
        m if m is not None and _reusable(m, d, kw, k, id(m) in growing) else None
        for m, (d, kw, k) in zip(matched, layer_data)
    ]
    kept = {id(m) for m in matched if m is not None}
    index = remove_layers(viewer, [ly for ly in [*replace, *drop] if id(ly) not in kept])
    if at is not None:
        index = min(at, index)
    start = min(index, len(viewer.layers))
    layers = [m if m is not None else Layer.create(d, dict(kw), k) for m, (d, kw, k) in zip(matched, layer_data)]
    new = [i for i, m in enumerate(matched) if m is None]
    placed: list[int] = []

    def add(i: int) -> None:
        # Each goes straight to its place in the list.
        viewer.layers.insert(start + sum(1 for j in placed if j < i), layers[i])
        placed.append(i)

    def add_slim(i: int) -> Any:
        # A layer that brings the viewer new axes: first without them (one slice), then the
        # whole data on the next turn (the returned follow-up). napari adding a layer and making
        # its new dims sliders in one turn stalled the GUI 0.16-0.17 s under software OpenGL;
        # each half takes about 0.1 s.
        d, kw, kind = layer_data[i]
        extra = _data_ndim(d, kw) - viewer.dims.ndim
        if owner is None or extra <= 0 or not _splittable(layer_data[i]):
            add(i)
            return None
        slim = {k: (tuple(v)[extra:] if k in _PER_AXIS else v) for k, v in kw.items()}
        layers[i] = Layer.create(d[(0,) * extra], slim, kind)
        add(i)
        return lambda: update_layer(layers[i], d, kw)

    # Reused layers first (cheap), then the new ones with the most axes first: the viewer's
    # dimensions then change once, not with every layer (each change re-slices every layer).
    reused = sorted(
        ((m, d, kw) for m, (d, kw, _) in zip(matched, layer_data) if m is not None),
        key=lambda t: t[0].ndim == _data_ndim(t[1], t[2]),  # a growing layer first: the new axes
    )
    actions = [lambda ly=m, d=d, kw=kw: update_layer(ly, d, kw) for m, d, kw in reused]
    actions += [lambda i=i: add_slim(i) for i in sorted(new, key=lambda i: -layers[i].ndim)]
    _run_per_turn(actions, owner, on_placed)
    return layers


#: Layer keywords with one value per axis (a slice of the leading axes drops theirs).
_PER_AXIS = ("scale", "translate", "axis_labels", "units")


def _splittable(item: LayerData) -> bool:
    """Can this new layer be added first as one slice of its leading axes (plain array data,
    geometry given per axis, no affine, rotation or shear)?"""
    d, kw, _ = item
    matrices = ("affine", "rotate", "shear")
    return not kw.get("multiscale") and not any(k in kw for k in matrices) and hasattr(d, "ndim")


#: Milliseconds between two layers added or updated in turn: room for a repaint between them.
PER_TURN_MS = 15


def _run_per_turn(actions: list[Any], owner: Any, on_placed: Any) -> None:
    """Run ``actions`` one per event-loop turn (all at once without ``owner``), then ``on_placed``.
    An action may return a follow-up action: it runs on the next turn."""
    if owner is None or not actions:
        for act in actions:
            follow = act()
            if callable(follow):
                follow()
        if on_placed is not None:
            on_placed()
        return
    from qtpy.QtCore import QTimer

    # ``on_placed`` gets a turn of its own too (after the last layer it added 25 ms to that turn).
    def placed() -> None:  # its return value is not a follow-up
        on_placed()

    pending = list(actions) + ([placed] if on_placed is not None else [])
    timer = QTimer(owner)  # dies with the widget: nothing runs after the dock is gone
    # Not 0: Qt ran a zero-interval timer's calls back to back, other timers and the canvas's
    # repaint waiting until all were done (a first run's 7 layers blocked the GUI 377 ms).
    timer.setInterval(PER_TURN_MS)

    def step() -> None:
        follow = pending.pop(0)()
        if callable(follow):
            pending.insert(0, follow)
        if not pending:
            timer.stop()
            timer.deleteLater()

    timer.timeout.connect(step)
    # The first one too after a turn: the run's end (its last frame, the dock's status) is painted
    # before the first new layer is made (together they stalled the GUI 150 ms on a first run).
    timer.start()


__all__ = [
    "image_layer_choices",
    "labels_layer_choices",
    "config_of",
    "free_prefix",
    "remove_layers",
    "place_layers",
    "update_layer",
]
