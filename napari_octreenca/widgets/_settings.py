"""Widget defaults from napari's plugin settings (the manifest's ``configurations``).

napari >= 0.9 keeps plugin settings in ``<napari config dir>/napari-octreenca.yaml`` and shows
them under Preferences; older napari has no plugin settings, so the built-in defaults apply.
"""

from __future__ import annotations

from typing import Any

PLUGIN = "napari-octreenca"
SECTION = "defaults"


def plugin_setting(key: str, default: Any) -> Any:
    """The user's default for ``key`` (section ``defaults``), or ``default``."""
    try:
        from napari.settings import get_plugin_settings

        section = getattr(get_plugin_settings(PLUGIN), SECTION)
        value = getattr(section, key)
    except Exception:  # napari without plugin settings, or the plugin not registered (tests)
        return default
    return default if value is None else value


__all__ = ["plugin_setting"]
