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


def image_layer_choices(viewer: Any) -> list[tuple[str, Any]]:
    """(name, layer) of every Image layer of ``viewer``."""
    from napari.layers import Image

    return [(ly.name, ly) for ly in viewer.layers if isinstance(ly, Image)]


def labels_layer_choices(viewer: Any) -> list[tuple[str, Any]]:
    """(name, layer) of every Labels layer of ``viewer``."""
    from napari.layers import Labels

    return [(ly.name, ly) for ly in viewer.layers if isinstance(ly, Labels)]


def config_of(name: str) -> Any:
    """The model config of a catalog model (read from its file header, no weights loaded)."""
    from ..nca.modelfile import read_config

    return read_config(CATALOG.path(name))


def free_prefix(viewer: Any, base: str, suffixes: Iterable[str]) -> str:
    """``base``, else ``base #2``, ``base #3``...: the first prefix with which none of the layer
    names ``prefix + suffix`` is taken (a kept run's layers keep their names; the next run's
    names say which run they are, instead of napari's ``[1]``)."""
    names = {ly.name for ly in viewer.layers}
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
    """Remove those of ``layers`` still in the viewer; returns the index the first one had."""
    index = len(viewer.layers)
    for layer in list(layers):
        if layer in viewer.layers:
            index = min(index, viewer.layers.index(layer))
            viewer.layers.remove(layer)
    return index


def add_layers(
    viewer: Any, layer_data: Sequence[LayerData], replace: Iterable[Any] = (), at: int | None = None
) -> list[Any]:
    """Add layer-data tuples with napari's public API (``Layer.create`` + ``viewer.add_layer``);
    the ``replace`` layers are removed first and the new ones take their place in the list (or
    go to position ``at``)."""
    from napari.layers import Layer

    index = remove_layers(viewer, replace)
    if at is not None:
        index = min(at, index)
    created = [Layer.create(data, dict(kwargs), kind) for data, kwargs, kind in layer_data]
    # Layers with the most axes first: the viewer's dimensions then change once, not with every
    # layer (each change re-slices every layer, the slowest part of adding many layers).
    for layer in sorted(created, key=lambda ly: -ly.ndim):
        viewer.add_layer(layer)
    # In the given order, where the replaced ones were (napari appends at the top).
    start = min(index, len(viewer.layers) - len(created))
    for k, layer in enumerate(created):
        viewer.layers.move(viewer.layers.index(layer), start + k)
    return created


__all__ = [
    "image_layer_choices",
    "labels_layer_choices",
    "config_of",
    "free_prefix",
    "remove_layers",
    "add_layers",
]
