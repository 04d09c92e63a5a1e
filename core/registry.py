"""Plugin loading and the component registry.

``load()`` builds a pluggy PluginManager from the built-in plugins (``gptx.plugins.*``) and the
third-party packages that declare the ``gptx`` entry-point group, asks every plugin to
register its components, and returns a ``Registry``: kind -> name -> ``Entry``.

A broken third-party plugin (import error, invalid or misspelled hook, bad registration) never
stops the others: it is left out and described in ``Registry.errors``, one line each, naming
the plugin, its module and its distribution. ``GPTX_LOAD_PLUGINS`` selects third-party plugins
by entry-point name (comma-separated); set it to an empty string to load none.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
from typing import Optional

import pluggy

from gptx import hookspecs
from gptx.errors import GptxError, first_line
from gptx.kinds import KINDS
from gptx.options import did_you_mean

ENTRY_POINT_GROUP = "gptx"


def _builtin_plugins() -> tuple[str, ...]:
    """Every module of ``gptx.plugins``: a built-in component is a module there, nothing else to list."""
    import pkgutil

    from gptx import plugins

    return tuple(sorted(f"gptx.plugins.{m.name}" for m in pkgutil.iter_modules(plugins.__path__)
                        if not m.ispkg and not m.name.startswith("_")))


BUILTIN_PLUGINS = _builtin_plugins()


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    name: str  # plugin name: the module for built-ins, the entry-point name for third parties
    module: str
    distribution: str  # "gptx" for built-ins
    version: str
    builtin: bool

@dataclasses.dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    cls: type
    plugin: PluginInfo
    overrides: Optional[PluginInfo] = None  # the plugin whose registration this one replaced

    @property
    def supports(self) -> frozenset:
        return frozenset(self.cls.supports)

class Registry:
    def __init__(self, pm: pluggy.PluginManager, plugins: dict[str, PluginInfo], entries, errors):
        self.pm = pm
        self.plugins = plugins  # plugin name -> info, loaded plugins only
        self.entries: dict[str, dict[str, Entry]] = entries  # kind -> name -> Entry
        self.errors: list[str] = errors  # one line per plugin that failed to load

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str, key: Optional[str] = None) -> Entry:
        """The entry for ``name``, or a GptxError naming the key with a 'did you mean'."""
        try:
            return self.entries[kind][name]
        except KeyError:
            known = ", ".join(self.names(kind)) or "none"
            where = f"{key}: " if key else ""
            raise GptxError(
                f"{where}unknown {kind} '{name}'{did_you_mean(name, self.entries[kind])}; registered: {known}"
            ) from None

    def hooks_of(self, plugin_name: str) -> list[str]:
        plugin = self.pm.get_plugin(plugin_name)
        return sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])

def _third_party_entry_points(selected: Optional[set[str]]):
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if selected is None or ep.name in selected:
            yield ep

def _selected_from_env() -> Optional[set[str]]:
    raw = os.environ.get("GPTX_LOAD_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}

def load(extra_plugins: tuple = ()) -> Registry:
    """Load every plugin and collect their registrations. ``extra_plugins`` (objects or modules
    with hook implementations) are registered too; tests use it to add components in-process."""
    pm, plugins, errors = _plugin_manager(True, extra_plugins)
    entries = _collect(pm, plugins, errors)
    return Registry(pm, plugins, entries, errors)


def load_third_party() -> tuple[pluggy.PluginManager, dict[str, PluginInfo], list[str]]:
    """The third-party plugins alone, their component hooks not called: enough for the commands
    they add (the built-in plugins add none), without importing torch for ``gptx --help``."""
    return _plugin_manager(False, ())


def _plugin_manager(builtins: bool, extra_plugins: tuple):
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    plugins: dict[str, PluginInfo] = {}
    errors: list[str] = []
    gptx_version = _version("gptx")

    def add(obj, info: PluginInfo) -> bool:
        try:
            pm.register(obj, name=info.name)
        except Exception as err:  # pluggy validates hook signatures here
            errors.append(_describe(info, err))
            return False
        try:
            pm.check_pending()  # a hook implementation whose name matches no hook spec
        except pluggy.PluginValidationError as err:
            pm.unregister(name=info.name)
            errors.append(_describe(info, err))
            return False
        plugins[info.name] = info
        return True

    for module_name in BUILTIN_PLUGINS if builtins else ():
        add(importlib.import_module(module_name), PluginInfo(module_name, module_name, "gptx", gptx_version, True))
    for ep in _third_party_entry_points(_selected_from_env()):
        dist = ep.dist.name if ep.dist else "unknown distribution"
        info = PluginInfo(ep.name, ep.value, dist, ep.dist.version if ep.dist else "?", False)
        try:
            obj = ep.load()
        except Exception as err:
            errors.append(_describe(info, err))
            continue
        add(obj, info)
    for i, obj in enumerate(extra_plugins):
        name = getattr(obj, "__name__", f"extra-{i}")
        add(obj, PluginInfo(name, name, "in-process", "-", False))
    return pm, plugins, errors

def _collect(pm, plugins: dict[str, PluginInfo], errors: list[str]) -> dict[str, dict[str, Entry]]:
    """Call each plugin's register hooks with a callback bound to that plugin, then resolve names.
    Resolution does not depend on load order: an ``override=True`` registration beats a plain
    one; two plain (or two overriding) registrations of one name are an error."""
    from gptx import components

    pending: dict[str, dict[str, list[tuple[type, PluginInfo, bool]]]] = {k.name: {} for k in KINDS}
    failed: set[str] = set()
    for k in KINDS:
        kind, hook_name, interface = k.name, k.hook, getattr(components, k.interface)
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            info = plugins[impl.plugin_name]
            if info.name in failed:
                continue
            staged: list[tuple[str, type, bool]] = []

            def register(name: str, cls: type, *, override: bool = False, _staged=staged, _kind=kind, _iface=interface):
                if not isinstance(name, str) or not name:
                    raise TypeError(f"{_kind} name must be a non-empty string, got {name!r}")
                if not (isinstance(cls, type) and issubclass(cls, _iface)):
                    raise TypeError(f"{_kind} '{name}' must be a subclass of gptx.components.{_iface.__name__}")
                _staged.append((name, cls, bool(override)))

            try:
                impl.function(register=register)
            except Exception as err:
                errors.append(_describe(info, err, hook_name))
                failed.add(info.name)
                continue
            for name, cls, override in staged:
                pending[kind].setdefault(name, []).append((cls, info, override))

    # a plugin that failed in any hook contributes nothing, so no half-registered plugin remains
    entries: dict[str, dict[str, Entry]] = {k.name: {} for k in KINDS}
    for kind, by_name in pending.items():
        for name, regs in by_name.items():
            regs = [r for r in regs if r[1].name not in failed]
            if not regs:
                continue
            winners = [r for r in regs if r[2]] or regs
            if len(winners) > 1:
                who = " and ".join(f"{r[1].name} ({r[1].distribution})" for r in winners)
                errors.append(
                    f"{kind} '{name}' is registered by both {who}; pass override=True in the one that should win"
                )
                # keep a built-in if one is among them, so the defaults always work
                winners = [r for r in winners if r[1].builtin][:1] or winners[:1]
            cls, info, _ = winners[0]
            replaced = next((r[1] for r in regs if r[1] is not info), None)
            entries[kind][name] = Entry(kind, name, cls, info, replaced)
    for name in failed:
        if name in plugins:
            pm.unregister(name=name)
            del plugins[name]
    return entries

def _describe(info: PluginInfo, err: Exception, hook: Optional[str] = None) -> str:
    where = f" in {hook}" if hook else ""
    msg = first_line(err) or type(err).__name__
    return f"plugin {info.name} ({info.module}) from {info.distribution} {info.version}{where}: {type(err).__name__}: {msg}"

def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"

_REGISTRY: Optional[Registry] = None

def registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load()
    return _REGISTRY

def use(reg: Optional[Registry]) -> None:
    """Replace the process-wide registry (tests that add in-process plugins); None reloads."""
    global _REGISTRY
    _REGISTRY = reg
