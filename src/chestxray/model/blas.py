"""One BLAS thread for the small NumPy products served next to the classifier (population check, detector)."""
from __future__ import annotations

from threadpoolctl import ThreadpoolController

_THREADPOOLS = ThreadpoolController()  # finding the loaded BLAS libraries is the slow part: once


def one_blas_thread():
    """A context in which NumPy's BLAS uses one thread.

    Products this small gain nothing from more, and after a multi-threaded product OpenBLAS's threads
    spin for a while: on a 2-core server they took the cores from the next image's ONNX Runtime call
    (70 ms instead of 33).
    """
    return _THREADPOOLS.limit(limits=1, user_api="blas")
