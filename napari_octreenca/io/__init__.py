"""Big-data input/output: lazy readers and writers, exact tiled and out-of-core inference.

- :mod:`.readers`: ``read_image(path) -> ImageData`` (NIfTI, TIFF/SVS/OME-TIFF, OME-Zarr, video, frames)
- :mod:`.writers`: ``write_labels(path, labels, like=None, class_names=None)``
- :mod:`.tiling`: ``segment_tiled`` (exact tiles, out-of-core zarr stores, resumable)
- :mod:`.distributed`: the same tiles on dask.distributed
- :mod:`.pipeline`: ``run_segment`` behind ``octreenca segment``
"""
