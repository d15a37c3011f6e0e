"""Every hook a mmgen plugin can implement. Hooks are ``mmgen_``-prefixed and called with keyword arguments.

A plugin is a module (or object) exposed through the entry-point group ``mmgen``; the built-in plugins use the same
path. Hooks run once, when :func:`mmgen.plugins.load_plugins` first builds the catalogue (before the command line is
parsed), in the main process only.
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("mmgen")
hookimpl = pluggy.HookimplMarker("mmgen")


# ---- registration: called once per plugin when the catalogue is built ----

@hookspec
def mmgen_register_modalities(register: Callable[[type], None]) -> None:
    """Register modality classes (subclasses of :class:`mmgen.modality.Modality`).

    Called by the plugin manager for each plugin on its own, with a ``register`` bound to that plugin, so the
    catalogue knows which plugin owns each name. Call ``register(SomeModality)`` once per class; the registered name
    is the class name (what a recipe writes as ``class_path``). Returns nothing. Registering a name another plugin
    already registered is an error naming both plugins.
    """
