"""Loading plugins from the `dgrun` entry-point group and building the step registry.

Each plugin is loaded and asked for its optimizers on its own, so one that fails to import or raises while
registering is reported by name and the others keep working. dgrun's own built-in plugin (entry point
`builtin` of the `dgrun` distribution) always loads; `DGRUN_LOAD_PLUGINS=a,b` limits the others to those
entry-point or distribution names (empty: none).
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from dgrun import hookspecs
from dgrun.errors import PluginError
from dgrun.optimizer import Optimizer

ENTRY_POINT_GROUP = "dgrun"
BUILTIN_PLUGIN = "builtin"

# Plugins registered in-process (dgrun.testing uses this); each is (name, distribution, module-or-object).
_IN_PROCESS: list[tuple[str, str, Any]] = []


@dataclass(frozen=True)
class OptimizerInfo:
    """A registered optimizer and the plugin distribution that provides it."""

    cls: type[Optimizer]
    plugin: str
    distribution: str
    version: str

    @property
    def package(self) -> str:
        return f"{self.distribution} {self.version}".strip()


@dataclass
class PluginRecord:
    """One plugin as `dgrun plugins` shows it."""

    name: str
    distribution: str
    version: str
    error: str | None = None
    traceback: str | None = None
    optimizers: list[str] = field(default_factory=list)


@dataclass
class Registry:
    """Every optimizer by step name, the plugins, and any name clashes between them."""

    manager: pluggy.PluginManager
    optimizers: dict[str, OptimizerInfo] = field(default_factory=dict)
    plugins: list[PluginRecord] = field(default_factory=list)
    clashes: list[str] = field(default_factory=list)

    def get(self, name: str) -> OptimizerInfo | None:
        return self.optimizers.get(name)

    def check_consistent(self) -> None:
        """Raise when two plugins provide one step name: which one runs would be an accident."""
        if self.clashes:
            raise PluginError("\n".join(self.clashes))

    def failed(self) -> list[PluginRecord]:
        return [p for p in self.plugins if p.error]

    def load_pipeline(self, model: Any, device: str, dtype: Any) -> Any:
        """Ask the plugins whether one of them owns `model.id`; None means use diffusers."""
        return self.manager.hook.dgrun_load_pipeline(model=model, device=device, dtype=dtype)


def _wanted() -> set[str] | None:
    raw = os.environ.get("DGRUN_LOAD_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _distribution(entry_point: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return entry_point.name, ""
    return dist.metadata["Name"] or entry_point.name, dist.version or ""


def build_registry() -> Registry:
    """Load every plugin and collect their optimizers. Never raises for one bad plugin."""
    manager = pluggy.PluginManager("dgrun")
    manager.add_hookspecs(hookspecs)
    registry = Registry(manager)
    wanted = _wanted()
    candidates: list[tuple[str, str, str, Any]] = []
    for entry_point in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        distribution, version = _distribution(entry_point)
        builtin = entry_point.name == BUILTIN_PLUGIN and distribution == "dgrun"
        if not builtin and wanted is not None and not ({entry_point.name, distribution} & wanted):
            continue
        candidates.append((entry_point.name, distribution, version, entry_point))
    for name, distribution, plugin in _IN_PROCESS:
        candidates.append((name, distribution, "", plugin))
    seen_modules: set[int] = set()
    for name, distribution, version, source in candidates:
        record = PluginRecord(name, distribution, version)
        registry.plugins.append(record)
        try:
            plugin = source.load() if isinstance(source, metadata.EntryPoint) else source
            if id(plugin) in seen_modules:
                continue
            seen_modules.add(id(plugin))
            manager.register(plugin, name=f"{distribution}:{name}")
        except Exception as exc:
            _fail(record, "could not be imported", exc)
            continue
        _collect(registry, record, plugin)
    return registry


def _fail(record: PluginRecord, what: str, exc: BaseException) -> None:
    record.error = f"{what}: {type(exc).__name__}: {exc}"
    record.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _collect(registry: Registry, record: PluginRecord, plugin: Any) -> None:
    impl = getattr(plugin, "dgrun_register_optimizers", None)
    if impl is None:
        return
    found: list[type[Optimizer]] = []

    def register(cls: type[Optimizer]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)) or not getattr(cls, "name", None):
            raise TypeError(f"register() takes an Optimizer subclass with a `name`, got {cls!r}")
        found.append(cls)

    try:
        impl(register=register)
    except Exception as exc:
        _fail(record, "raised while registering its optimizers", exc)
        return
    for cls in found:
        existing = registry.optimizers.get(cls.name)
        if existing is not None and existing.cls is not cls:
            registry.clashes.append(
                f"step {cls.name!r} is provided by two plugins: {existing.package} and "
                f"{record.distribution} {record.version}".rstrip()
                + "; uninstall one, or choose with DGRUN_LOAD_PLUGINS"
            )
            continue
        registry.optimizers[cls.name] = OptimizerInfo(cls, record.name, record.distribution, record.version)
        record.optimizers.append(cls.name)
