"""Qt pieces the dock widgets share: a dock that scrolls, a line that elides with a tooltip, a
fold-away group of advanced settings, and a hook that fires when napari closes the dock."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from magicgui.widgets import CheckBox, Container, Label
from qtpy.QtCore import QEvent, QObject, Qt
from qtpy.QtWidgets import QSizePolicy


class DockContainer(Container):
    """A labelled magicgui Container that napari docks inside a scroll area, so a tall dock fits
    a 1366x768 screen (napari docks ``.native``; here that is the scroll area). Put extra Qt
    widgets into :attr:`body`."""

    def __init__(self) -> None:
        super().__init__(scrollable=True, labels=True)
        self.root_native_widget.setMinimumHeight(120)
        from ..napari_io import prefer_plugin_reader

        prefer_plugin_reader()  # first use of the plugin: drag and drop opens our formats unasked

    @property
    def native(self) -> Any:  # the scroll area: what napari puts into the dock
        return self.root_native_widget

    @property
    def body(self) -> Any:
        """The QWidget inside the scroll area that holds the layout."""
        return self._widget._mgui_get_native_widget()

    def end_layout(self) -> None:
        """Call after the last widget: spare height goes below the controls instead of spreading
        them apart (the scroll area stretches its widget to the dock's height)."""
        from qtpy.QtWidgets import QComboBox

        self.body.layout().addStretch(1)
        # Combo boxes as wide as their longest item ("cuda:0 NVIDIA ... (80.0 GB free of ...)")
        # would make the dock wider than the screen allows; they shrink and elide instead.
        for combo in self.body.findChildren(QComboBox):
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(8)
        scroll = self.root_native_widget
        width = self.body.minimumSizeHint().width()
        scrollbar = max(scroll.verticalScrollBar().sizeHint().width(), 16)
        scroll.setMinimumWidth(width + scrollbar + 2 * scroll.frameWidth() + 4)


class _Filter(QObject):
    """Calls ``on_event(event)`` for the events of one widget."""

    def __init__(self, on_event: Callable[[Any], None]) -> None:
        super().__init__()
        self._on_event = on_event

    def eventFilter(self, obj: Any, event: Any) -> bool:
        self._on_event(event)
        return False


class ElidedLabel(Label):
    """A one-line label that never resizes the dock: long text ends in "..." and the whole text
    is the tooltip. ``value`` is the whole text."""

    def __init__(self, **kwargs: Any) -> None:
        self._full = ""
        super().__init__(**kwargs)
        native = self.native
        # A label that grows with its text resizes the dock, which redraws the canvas (slow under
        # software OpenGL, and it takes the CPU the run needs).
        native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        native.setMinimumWidth(80)
        native.setWordWrap(False)
        self._filter = _Filter(lambda ev: self._elide() if ev.type() == QEvent.Type.Resize else None)
        native.installEventFilter(self._filter)

    @property
    def value(self) -> str:
        return self._full

    @value.setter
    def value(self, text: Any) -> None:
        self._full = "" if text is None else str(text)
        self.native.setToolTip(self._full)
        self._elide()

    def _elide(self) -> None:
        native = self.native
        width = max(40, native.width())
        native.setText(native.fontMetrics().elidedText(self._full, Qt.TextElideMode.ElideRight, width))

    @property
    def shown_text(self) -> str:
        """The text on screen (elided)."""
        return str(self.native.text())


def advanced_group(widgets: Sequence[Any], text: str = "advanced settings") -> tuple[CheckBox, Container]:
    """A check box that shows or hides a group of settings (hidden at first), the habit of
    cellpose-napari and micro-sam: a few main controls, the rest folded away."""
    group = Container(widgets=list(widgets), labels=True, visible=False)
    group.margins = (0, 0, 0, 0)
    toggle = CheckBox(text=text, value=False)

    def show(on: bool) -> None:
        group.visible = bool(on)

    toggle.changed.connect(show)
    return toggle, group


def on_dock_closed(widget: Any, callback: Callable[[], Any]) -> None:
    """Call ``callback`` once when napari removes ``widget``'s dock (its close button) or the
    widget is destroyed: a run must not go on for a dock the user closed."""
    fired = [False]

    def fire(*_: Any) -> None:
        if not fired[0]:
            fired[0] = True
            try:
                callback()
            except (AttributeError, RuntimeError):  # the widget is being torn down: nothing runs
                pass

    root = widget.native

    def on_event(ev: Any) -> None:
        if ev.type() == QEvent.Type.ParentChange and root.parent() is None and getattr(widget, "_docked", False):
            fire()
        elif ev.type() == QEvent.Type.ParentChange and root.parent() is not None:
            widget._docked = True  # napari put it into a dock: leaving it again means closed

    widget._close_filter = _Filter(on_event)
    root.installEventFilter(widget._close_filter)
    root.destroyed.connect(fire)


__all__ = ["DockContainer", "ElidedLabel", "advanced_group", "on_dock_closed"]
