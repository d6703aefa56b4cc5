"""The one table of file formats: which endings each reader takes, which of them the napari
plugin claims, and which the label writers write. Standard library only (the napari manifest
check and ``napari_io.get_reader`` use it without importing a reader).

``python -m napari_octreenca.io.formats`` prints the ``filename_patterns`` block of
``napari.yaml``; ``tests/napari/test_napari_io.py`` checks the manifest against this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    """A file format: its reader ``kind`` (as ``readers.file_kind`` names it) and its endings."""

    kind: str
    suffixes: tuple[str, ...]  # lower case, longest first where one ends another
    plugin: bool = True  # claimed by the napari plugin's reader (drag and drop)


FORMATS: tuple[Format, ...] = (
    Format("nifti", (".nii.gz", ".nii")),
    Format("tiff", (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".svs", ".ndpi", ".scn", ".btf", ".tf8", ".qptiff")),
    Format("ome-zarr", (".ome.zarr", ".zarr")),
    Format("video", (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")),
    # Single pictures and folders of frames: napari's own readers open pictures well, so the
    # plugin does not claim these endings (no reader prompt for a .png).
    Format("frames", (".png", ".jpg", ".jpeg", ".bmp"), plugin=False),
)


def suffixes(kind: str) -> tuple[str, ...]:
    """The endings of one reader ``kind``."""
    for f in FORMATS:
        if f.kind == kind:
            return f.suffixes
    raise KeyError(kind)


def plugin_suffixes() -> tuple[str, ...]:
    """Every ending the napari plugin's reader claims."""
    return tuple(s for f in FORMATS if f.plugin for s in f.suffixes)


def napari_patterns() -> list[str]:
    """The reader's ``filename_patterns`` for ``napari.yaml``."""
    return ["*" + s for s in plugin_suffixes()]


if __name__ == "__main__":
    print("      filename_patterns:")
    for pattern in napari_patterns():
        print(f'        - "{pattern}"')
