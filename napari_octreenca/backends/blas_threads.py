"""One BLAS thread while numba's workers call BLAS (the fused training step's tile products).

numba's ``np.dot`` calls the sgemm of scipy's BLAS (OpenBLAS in scipy's wheels). Called from
several numba workers at once, a multi-threaded OpenBLAS starts its own threads on top of them
(or, under numba's OpenMP layer, warns that it may hang); the tiles are small enough that one
thread a call is also the fastest. threadpoolctl sets the limit for the duration and puts the
user's setting back afterwards.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from typing import Any


@functools.lru_cache(maxsize=1)
def _controller() -> Any:
    # numba binds np.dot to scipy.linalg.cython_blas: load it first, so the controller sees it.
    import scipy.linalg.cython_blas  # noqa: F401
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def single_threaded() -> AbstractContextManager[Any]:
    """A context in which every loaded BLAS library runs one thread per call."""
    return _controller().limit(limits=1, user_api="blas")
