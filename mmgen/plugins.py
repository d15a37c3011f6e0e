"""The plugin manager (pluggy) and the catalogue of registered names, built lazily from the entry-point group ``mmgen``.

``MMGEN_PLUGINS`` (comma-separated entry-point or distribution names) restricts which entry points load.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
from dataclasses import dataclass

import pluggy

from mmgen import hookspecs

__all__ = ["PluginError", "Registration", "get_modality", "load_plugins", "modalities", "plugin_manager",
           "plugin_info", "reset"]

ENTRY_POINT_GROUP = "mmgen"
ENV_RESTRICT = "MMGEN_PLUGINS"


class PluginError(LookupError):
    """A plugin failed to load, a name is unknown, or two plugins claim one name."""


@dataclass(frozen=True)
class Registration:
    """One registered name: the class, and the plugin and distribution that own it."""

    name: str
    cls: type
    plugin: str
    distribution: str | None
    version: str | None

    def owner(self) -> str:
        dist = f"{self.distribution} {self.version}" if self.distribution else "not installed as a distribution"
        return f"plugin {self.plugin!r} ({dist})"


_pm: pluggy.PluginManager | None = None
_loaded = False
_dists: dict[str, tuple[str | None, str | None]] = {}  # plugin name -> (distribution, version)
_failures: dict[str, str] = {}  # plugin name -> error text


def plugin_manager() -> pluggy.PluginManager:
    """The one plugin manager of the process (created on first use, entry points not yet loaded)."""
    global _pm
    if _pm is None:
        _pm = pluggy.PluginManager("mmgen")
        _pm.add_hookspecs(hookspecs)
    return _pm


def _allowed(ep: md.EntryPoint) -> bool:
    restrict = os.environ.get(ENV_RESTRICT)
    if restrict is None:
        return True
    names = {n.strip() for n in restrict.split(",") if n.strip()}
    dist = ep.dist.name if ep.dist is not None else None
    return ep.name in names or dist in names


def load_plugins() -> pluggy.PluginManager:
    """Load the ``mmgen`` entry points once, one at a time; a plugin that fails to import is reported and skipped."""
    global _loaded
    pm = plugin_manager()
    if _loaded:
        return pm
    _loaded = True
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if not _allowed(ep) or pm.get_plugin(ep.name) is not None:
            continue
        dist = (ep.dist.name, ep.dist.version) if ep.dist is not None else (None, None)
        _dists[ep.name] = dist  # also for a plugin that fails: `mmgen plugins` names its distribution with the error
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
            _check_hooks(pm, plugin)
        except Exception as exc:  # one broken plugin must not take the others down
            pm.unregister(name=ep.name)  # no-op unless it got (half) registered
            _report(ep.name, f"failed to load entry point {ep.value!r} from {dist[0]}: {type(exc).__name__}: {exc}")
    pm.check_pending()
    return pm


def _check_hooks(pm: pluggy.PluginManager, plugin: object) -> None:
    """``pm.check_pending()`` for one plugin, so a hook this mmgen lacks fails that plugin only, not the whole load."""
    for caller in pm.get_hookcallers(plugin) or ():
        if not caller.has_spec() and any(i.plugin is plugin and not i.optionalhook for i in caller.get_hookimpls()):
            raise pluggy.PluginValidationError(
                plugin, f"unknown hook {caller.name!r} (not defined by this mmgen version; a plugin can mark it "
                        f"@hookimpl(optionalhook=True))")


def _report(plugin: str, message: str) -> None:
    _failures[plugin] = message
    print(f"mmgen: plugin {plugin!r} {message}", file=sys.stderr)


def modalities() -> dict[str, Registration]:
    """The catalogue of modality names, rebuilt from the plugin manager (so in-process plugins count too)."""
    pm = load_plugins()
    catalogue: dict[str, Registration] = {}
    for impl in pm.hook.mmgen_register_modalities.get_hookimpls():
        plugin_name = impl.plugin_name
        dist, version = _dists.get(plugin_name, (None, None))

        def register(cls: type, _plugin: str = plugin_name, _dist=dist, _version=version) -> None:
            from mmgen.modality import Modality

            if not (isinstance(cls, type) and issubclass(cls, Modality)):
                raise TypeError(f"plugin {_plugin!r} registered {cls!r}, which is not a subclass of mmgen.Modality")
            reg = Registration(cls.__name__, cls, _plugin, _dist, _version)
            other = catalogue.get(reg.name)
            if other is not None and (other.cls is not cls or other.plugin != reg.plugin):
                raise PluginError(f"modality name {reg.name!r} is registered by two plugins: {other.owner()} and "
                                  f"{reg.owner()}; uninstall one or restrict loading with {ENV_RESTRICT}")
            catalogue[reg.name] = reg

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:  # report the plugin by name; the others still register
            if plugin_name not in _failures:
                _report(plugin_name, f"raised in mmgen_register_modalities: {type(exc).__name__}: {exc}")
    return catalogue


def known_names(catalogue: dict[str, Registration]) -> str:
    if not catalogue:
        return "none (no mmgen plugin is installed)"
    return ", ".join(f"{name} ({reg.owner()})" for name, reg in sorted(catalogue.items()))


def get_modality(name: str) -> type:
    """The modality class registered as ``name``; an unknown name lists the known ones and their plugins."""
    catalogue = modalities()
    if name in catalogue:
        return catalogue[name].cls
    failed = "".join(f"; plugin {p!r} failed: {m}" for p, m in _failures.items())
    raise PluginError(f"unknown modality {name!r}; known modalities: {known_names(catalogue)}{failed}")


def registration_of(cls: type) -> Registration | None:
    """The catalogue entry of a class, if it is registered."""
    for reg in modalities().values():
        if reg.cls is cls:
            return reg
    return None


def plugin_info() -> list[dict]:
    """One entry per plugin: its name, distribution, version, the names it registers, and any failure."""
    catalogue = modalities()
    pm = plugin_manager()
    rows = []
    for name in sorted({n for n, _ in pm.list_name_plugin()} | set(_failures)):
        dist, version = _dists.get(name, (None, None))
        rows.append({"plugin": name, "distribution": dist, "version": version,
                     "modalities": sorted(r.name for r in catalogue.values() if r.plugin == name),
                     "error": _failures.get(name)})
    return rows


def reset() -> None:
    """Forget every plugin (tests use this to start clean)."""
    global _pm, _loaded
    _pm = None
    _loaded = False
    _dists.clear()
    _failures.clear()
