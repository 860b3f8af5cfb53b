"""The plugin manager: built-in default plugins plus third-party plugins found through entry points.

Third-party plugins are modules (or objects) exposed under the ``longlora_plugin`` entry-point group. The
``LONGLORA_PLUGINS`` environment variable limits loading: unset or "all" loads every installed plugin, "none" (or
"0") loads none, and a comma-separated list of entry-point names loads only those.
"""

from __future__ import annotations

import functools
import os

import pluggy

from . import hookspecs
from .data.formats import BuiltinDatasetFormats
from .builtin_plugin import BuiltinFamilies

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV_VAR",
    "dataset_formats",
    "get_plugin_manager",
    "installed_plugins",
    "reset_plugin_manager",
]

ENTRY_POINT_GROUP = "longlora_plugin"
PLUGINS_ENV_VAR = "LONGLORA_PLUGINS"


def _allowed_names() -> set[str] | None:
    """None means all; an empty set means none."""
    value = os.environ.get(PLUGINS_ENV_VAR, "").strip()
    if value.lower() in ("", "all"):
        return None
    if value.lower() in ("none", "0"):
        return set()
    return {name.strip() for name in value.split(",") if name.strip()}


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    allowed = _allowed_names()
    if allowed is None:
        manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        return
    for name in sorted(allowed):
        manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)


@functools.lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(BuiltinFamilies(), name="longlora.builtin.families")
    manager.register(BuiltinDatasetFormats(), name="longlora.builtin.dataset_formats")
    _load_entry_points(manager)
    manager.check_pending()
    return manager


def reset_plugin_manager() -> None:
    """Forget the plugin manager, so that the next call loads plugins again (after changing the env var)."""
    get_plugin_manager.cache_clear()


def dataset_formats() -> dict:
    """Every dataset format the loaded plugins offer, by name (a later plugin's format wins a name clash)."""
    formats = {}
    for offered in reversed(get_plugin_manager().hook.longlora_dataset_formats()):
        for data_format in offered:
            formats[data_format.name] = data_format
    return formats


def installed_plugins() -> list[dict[str, str]]:
    """Third-party plugins that were loaded: entry-point name, distribution and version."""
    manager = get_plugin_manager()
    found = []
    for plugin, dist in manager.list_plugin_distinfo():
        found.append(
            {
                "name": manager.get_name(plugin) or repr(plugin),
                "distribution": dist.metadata["Name"] if dist is not None else "?",
                "version": dist.version if dist is not None else "?",
            }
        )
    return found
