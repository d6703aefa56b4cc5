"""File formats only: lazy readers and atomic writers.

- :mod:`.readers`: ``read_image(path) -> ImageData`` (NIfTI, TIFF/SVS/OME-TIFF, OME-Zarr, video, frames)
- :mod:`.writers`: ``write_labels(path, labels, like=None, class_names=None)``
- :mod:`.ome_zarr`, :mod:`.video`: the OME-Zarr and video formats

Running a model on files (tiling, out-of-core, dask, the pipeline) is the run layer's job (``run/``).
"""
