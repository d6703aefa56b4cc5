"""Running engine jobs off the GUI thread, with cancel, throttled progress and clean errors.

A :class:`Job` runs ``fn(job)`` in a Qt worker thread (superqt's ``FunctionWorker``, which napari's
workers build on). The engine's callbacks run in
that worker thread; they talk to the GUI only through the :class:`Relay`'s Qt signals, which Qt
queues onto the GUI thread. ``job.cancel`` is the ``threading.Event`` handed to the engine.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Signal
from superqt.utils import create_worker

from ..nca.errors import Cancelled
from .shared import WARM_UP_LAYER

_warm_up_threads: dict[str, threading.Thread] = {}


#: Environment variable that turns the docks' background warm-up off ("0").
WARM_UP_ENV = "NAPARI_OCTREENCA_WARM_UP"


def warm_up_in_background(training: bool = False) -> threading.Thread:
    """Load the engine's kernels in a daemon thread, once per process (``run.warmup``).

    The docks call this when they open: the first run then starts with the kernels and pandas
    (which the result layers need) loaded, so the lock-holding loading work does not stall the
    GUI during it. ``training`` (the Train dock): the training step's kernels instead. A failure
    here is ignored: the real run meets the same problem and reports it. With the environment
    variable ``NAPARI_OCTREENCA_WARM_UP=0`` nothing is loaded ahead (the returned thread does
    nothing): the first run loads what it needs, as before.
    """
    what = "training" if training else "inference"
    if os.environ.get(WARM_UP_ENV, "1") == "0":
        off = threading.Thread(target=lambda: None, name=f"octreenca-warm-up-{what}-off", daemon=True)
        off.start()
        return off
    thread = _warm_up_threads.get(what)
    if thread is None:
        from ..run.warmup import warm_up, warm_up_training

        def work() -> None:
            try:
                if training:
                    warm_up_training("cpu")
                    return
                warm_up("cpu")
                # The result layers' class table is a pandas DataFrame: its first import (hundreds
                # of modules, 0.2-0.4 s) stalled the GUI at the end of a first run.
                import pandas  # noqa: F401
            except Exception:  # noqa: S110 - reported by the first real run instead
                pass

        thread = threading.Thread(target=work, name=f"octreenca-warm-up-{what}", daemon=True)
        _warm_up_threads[what] = thread
        thread.start()
    return thread


#: Environment variable that turns :func:`warm_up_layers` alone off ("0").
WARM_UP_LAYERS_ENV = "NAPARI_OCTREENCA_WARM_UP_LAYERS"
#: Viewers whose layer types are warm: weakly held, so a closed viewer is forgotten.
_warm_viewers: weakref.WeakSet[Any] = weakref.WeakSet()


def warm_up_layers(viewer: Any, owner: Any, on_done: Callable[[], Any] | None = None) -> bool:
    """Show a tiny layer of each type the viewer lacks (Image, Labels) for a moment, once per
    viewer, when a dock opens.

    napari pays for a layer type's first layer in a viewer: the first Labels layer took 140 ms to
    make and add, the next ones 60 ms (Xvfb, software OpenGL), and that first one stalled the GUI
    when a run's results arrived. Paid here, while the dock opens. The layers (2x2, transparent,
    inside the current field of view, named ``octreenca warm-up``) are removed after their first
    paint, even if the dock closes meanwhile; the user's layer selection is put back. Started by a
    timer owned by ``owner`` (nothing is added once the dock is gone); off with
    ``NAPARI_OCTREENCA_WARM_UP=0`` (or ``NAPARI_OCTREENCA_WARM_UP_LAYERS=0``, this part alone) and
    for viewers without a window (``ViewerModel``). Returns whether a warm-up was started;
    ``on_done()`` runs when it has finished (or at once).
    """
    from napari.layers import Image, Labels
    from qtpy.QtCore import QTimer

    def finish() -> None:
        if on_done is not None:
            on_done()

    off = "0" in (os.environ.get(WARM_UP_ENV, "1"), os.environ.get(WARM_UP_LAYERS_ENV, "1"))
    if off or getattr(viewer, "window", None) is None or viewer in _warm_viewers:
        finish()
        return False
    _warm_viewers.add(viewer)
    kinds = [k for k in (Image, Labels) if not any(type(ly) is k for ly in viewer.layers)]
    if not kinds:
        finish()
        return False
    added: list[Any] = []

    def show() -> None:
        sel = viewer.layers.selection
        state = (set(sel), sel.active)
        extent = np.asarray(viewer.layers.extent.world) if len(viewer.layers) else np.zeros((2, 2))
        corner = tuple(float(v) for v in extent[0][-2:])  # inside the view: the dims' ranges stay
        step = tuple(float(v) for v in (viewer.layers.extent.step[-2:] if len(viewer.layers) else (1.0, 1.0)))
        meta = {WARM_UP_LAYER: True}
        for k in kinds:
            data = np.zeros((2, 2), np.uint8 if k is Labels else np.float32)
            layer = k(data, name="octreenca warm-up", scale=step, translate=corner, metadata=meta)
            layer.opacity = 0.0  # drawn (shaders compiled), not seen
            viewer.layers.append(layer)
            added.append(layer)
        sel.clear()
        sel.update(state[0])
        sel.active = state[1]
        QTimer.singleShot(WARM_UP_PAINT_MS, hide)  # after the canvas's next paint; not owned: always runs

    def hide() -> None:
        sel = viewer.layers.selection
        state = (set(sel), sel.active)
        with viewer.layers.batched_update():
            for layer in added:
                if layer in viewer.layers:
                    viewer.layers.remove(layer)
        sel.clear()
        sel.update(state[0] - set(added))
        if state[1] not in added:
            sel.active = state[1]
        finish()

    timer = QTimer(owner)  # dies with the dock
    timer.setSingleShot(True)
    timer.timeout.connect(show)
    timer.start(0)  # once the dock is in the window
    return True


#: Milliseconds the warm-up layers stay: long enough for the canvas to paint them once.
WARM_UP_PAINT_MS = 60


class Relay(QObject):
    """Signals from the worker thread to the GUI thread (queued connections)."""

    progress = Signal(object)
    frame = Signal(object)
    notice = Signal(str)


class Throttle:
    """True at most every ``interval`` seconds (and always when ``force``)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = -1e30

    def __call__(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            return True
        return False


class Job:
    """One cancellable background job.

    ``on_done(result)`` runs on the GUI thread after success; ``on_cancelled()`` after a cancel;
    errors become a napari error notification (and ``on_error(exc)`` if given); ``on_finished()``
    always runs last, so the widget can re-enable its buttons.
    """

    def __init__(
        self,
        fn: Callable[[Job], Any],
        *,
        on_done: Callable[[Any], Any],
        on_finished: Callable[[], Any],
        on_cancelled: Callable[[], Any] | None = None,
        on_error: Callable[[BaseException], Any] | None = None,
        what: str = "job",
    ) -> None:
        self.cancel = threading.Event()
        self.pause = threading.Event()
        self.relay = Relay()
        self.relay.notice.connect(show_warning)
        self.what = what
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self.returned_at: float | None = None  # when ``fn`` returned, before the GUI adds results
        self.cancelled = False
        self.error: BaseException | None = None
        self._holds = 0  # the GUI still adds results: the job ends when they are all shown
        self._worker_done = False
        self._on_done, self._on_finished = on_done, on_finished
        self._on_cancelled, self._on_error = on_cancelled, on_error

        # superqt's worker (napari's own re-raises or reports every error, a cancel included):
        # here errors are handled once, below, and a cancel is not an error.
        def run(job: Job) -> Any:
            result = fn(job)
            job.returned_at = time.monotonic()
            return result

        self.worker = create_worker(run, self, _start_thread=False, _ignore_errors=True)
        self.worker.returned.connect(self._returned)
        self.worker.errored.connect(self._errored)
        self.worker.finished.connect(self._finished)

    def start(self) -> None:
        self.started = time.monotonic()
        self.worker.start()

    def prepare_callback(self, throttle: Throttle) -> Callable[[dict[str, Any]], None]:
        """The engine's ``prepare_callback`` (a derived channel's frame k of T) as throttled
        ``relay.progress`` signals; the last frame always goes through."""

        def on_prepare(p: dict[str, Any]) -> None:
            if throttle(force=p["frame"] == p["frames"]):
                self.relay.progress.emit(dict(p))

        return on_prepare

    def request_cancel(self) -> None:
        """Ask the engine to stop; it raises ``Cancelled`` within one step."""
        self.cancel.set()
        self.pause.clear()

    @property
    def running(self) -> bool:
        return self.finished_at is None

    def hold(self) -> None:
        """Keep the job running after the worker returned (results still being added, one per
        event-loop turn); :meth:`release` ends it."""
        self._holds += 1

    def release(self) -> None:
        self._holds = max(0, self._holds - 1)
        if self._holds == 0 and self._worker_done and self.finished_at is None:
            self._finish()

    def _returned(self, result: Any) -> None:
        try:
            self._on_done(result)
        except Exception as exc:  # a failure while adding layers must reach the user too
            self._errored(exc)

    def _errored(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            self.cancelled = True
            show_info(f"{self.what} cancelled")
            if self._on_cancelled is not None:
                self._on_cancelled()
            return
        self.error = exc
        show_error(f"{self.what} failed: {exc}")
        if self._on_error is not None:
            self._on_error(exc)

    def _finished(self) -> None:
        self._worker_done = True
        if self._holds == 0:
            self._finish()

    def _finish(self) -> None:
        self.finished_at = time.monotonic()
        self._on_finished()


__all__ = ["Job", "Relay", "Throttle"]
