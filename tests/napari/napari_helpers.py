"""Helpers shared by the napari widget tests."""

from __future__ import annotations


def wait(qtbot, job, timeout: float = 60.0) -> None:
    """Wait until a widget's background job has finished."""
    qtbot.waitUntil(lambda: not job.running, timeout=int(timeout * 1000))
