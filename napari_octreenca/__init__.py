"""napari-octreenca: segment very large medical images with OctreeNCA.

The engine (``napari_octreenca.engine``) imports no napari or Qt; the napari plugin lives in
``napari_octreenca.widgets`` and the readers/writers in ``napari_octreenca.io``.
"""

__version__ = "0.1.0"

from .engine import OctreeNCA, load_model, open_model, preset, save_model, segment  # noqa: E402

__all__ = ["OctreeNCA", "load_model", "open_model", "preset", "save_model", "segment", "__version__"]
