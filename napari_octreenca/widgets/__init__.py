"""The napari widgets: segment, NCA inspector, training (imported lazily by napari's manifest)."""
