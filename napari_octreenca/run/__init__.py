"""The run layer: the octree level loop, run planning, tiling, out-of-core, distributed runs, training.

Above the NCA core and the backends; below the shells (CLI, napari widgets). Formats (``io``) are
beside it: the run layer reads and writes files through ``io``.
"""
