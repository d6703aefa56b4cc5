"""Helpers shared by the napari widget tests."""

from __future__ import annotations


def wait(qtbot, job, timeout: float = 60.0) -> None:
    """Wait until a widget's background job has finished."""
    qtbot.waitUntil(lambda: not job.running, timeout=int(timeout * 1000))


def motion_model(catalog, folder) -> str:
    """A tiny untrained video model with a motion channel, added to the dock's catalog."""
    from napari_octreenca import OctreeNCA, preset, save_model

    cfg = preset("surgery", steps=(1, 1, 1), factors=((2, 2, 2), (2, 2, 2))).replace(
        input_channels=4, input_features=("motion",)
    )
    return catalog.add(save_model(OctreeNCA(cfg), folder / "motion.safetensors"))


def record_status(widget, handler: str) -> list[str]:
    """Wrap the dock's progress handler ``handler`` (start() connects it) so that every status
    line it shows is recorded; returns the list they go to."""
    seen: list[str] = []
    shown = getattr(widget, handler)

    def recorded(p):
        shown(p)
        seen.append(str(widget.status.value))

    setattr(widget, handler, recorded)
    return seen
