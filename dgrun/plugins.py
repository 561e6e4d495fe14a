"""Loading plugins from the `dgrun` entry-point group and building the step registry.

Every plugin goes through pluggy: it is registered on one PluginManager (pluggy checks each hook
implementation's arguments against its spec), a hook no spec declares is an error naming the plugin, and
the registration hook is called through `get_hookimpls`, one plugin at a time, so a plugin that fails to
import or raises while registering is reported by name and the others keep working.

What a plugin registers is checked at once: an Optimizer subclass, a snake_case name, closed and strict
`Params` (a `StepParams` subclass), and rules that name known steps or tags (unknown ones are warnings).
Two plugins providing one step name is a clash that fails only the recipes using that name.

`DGRUN_LOAD_PLUGINS=a,b` loads only those plugins (by entry-point or distribution name; empty: none but
dgrun's own built-ins); `DGRUN_LOAD_PLUGINS=-a` loads all but `a`. Names that match no installed plugin are
reported, and every "unknown step" message says when the filter is set.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from dgrun import hookspecs
from dgrun.optimizer import BUILTIN_TAGS, Optimizer, StepParams

ENTRY_POINT_GROUP = "dgrun"
BUILTIN_PLUGIN = "builtin"
FILTER_ENV = "DGRUN_LOAD_PLUGINS"
STEP_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

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
    """One plugin as `dgrun plugins` shows it: what it provides and what is wrong with it."""

    name: str
    distribution: str
    version: str
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    optimizers: list[str] = field(default_factory=list)


@dataclass
class Registry:
    """Every optimizer by step name, the plugins, and the names two plugins both provide."""

    manager: pluggy.PluginManager
    optimizers: dict[str, OptimizerInfo] = field(default_factory=dict)
    plugins: list[PluginRecord] = field(default_factory=list)
    clashes: dict[str, list[OptimizerInfo]] = field(default_factory=dict)
    filter_note: str | None = None  # set when DGRUN_LOAD_PLUGINS limits what was loaded

    def get(self, name: str) -> OptimizerInfo | None:
        """The optimizer for a step name (None for unknown and clashing names: see `clash_message`)."""
        return None if name in self.clashes else self.optimizers.get(name)

    def clash_message(self, name: str) -> str | None:
        """Why a step name cannot be used: two plugins provide it; how to choose one."""
        providers = self.clashes.get(name)
        if not providers:
            return None
        packages = " and ".join(dict.fromkeys(p.package for p in providers))
        if len({p.distribution for p in providers}) == 1:
            return f"step {name!r} is registered twice by {packages}; the plugin must register it once"
        drop = providers[-1].distribution
        return (
            f"step {name!r} is provided by two plugins: {packages}; uninstall one, or choose with "
            f"{FILTER_ENV}=-{drop} (excludes {drop})"
        )

    def failed(self) -> list[PluginRecord]:
        return [p for p in self.plugins if p.error]

    def problems(self) -> list[str]:
        """Everything `dgrun plugins` must report: broken plugins and clashes."""
        lines = [f"{p.distribution} ({p.name}): {p.error}" for p in self.failed()]
        lines += [self.clash_message(name) or "" for name in sorted(self.clashes)]
        return lines

    def load_pipeline(self, model: Any, device: str, dtype: Any) -> Any:
        """Ask the plugins whether one of them owns `model.id`; None means use diffusers."""
        return self.manager.hook.dgrun_load_pipeline(model=model, device=device, dtype=dtype)


def _filter() -> tuple[set[str] | None, set[str]]:
    """(only these, never these) from DGRUN_LOAD_PLUGINS; None: no `only` list."""
    raw = os.environ.get(FILTER_ENV)
    if raw is None:
        return None, set()
    names = [name.strip() for name in raw.split(",") if name.strip()]
    excluded = {name[1:].strip() for name in names if name.startswith("-")}
    included = {name for name in names if not name.startswith("-")}
    return (included if included or not excluded else None), excluded


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
    wanted, excluded = _filter()
    installed = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    candidates: list[tuple[str, str, str, Any]] = []
    for entry_point in installed:
        distribution, version = _distribution(entry_point)
        names = {entry_point.name, distribution}
        builtin = entry_point.name == BUILTIN_PLUGIN and distribution == "dgrun"
        if not builtin and ((wanted is not None and not names & wanted) or names & excluded):
            continue
        candidates.append((entry_point.name, distribution, version, entry_point))
    candidates += [(name, distribution, "", plugin) for name, distribution, plugin in _IN_PROCESS]
    _note_filter(registry, installed, wanted, excluded)
    loaded = [found for source in candidates if (found := _load(registry, *source)) is not None]
    try:
        manager.check_pending()  # a hook implementation no spec declares (caught per plugin above)
    except pluggy.PluginValidationError as exc:
        broken = next((r for r, plugin in loaded if plugin is exc.plugin), None)
        if broken is not None:
            broken.error = f"invalid hook implementation: {exc}"
    for record, plugin in loaded:
        if record.error is None:
            _collect(registry, record, plugin)
    _check_rules(registry)
    return registry


def _note_filter(
    registry: Registry, installed: list[Any], wanted: set[str] | None, excluded: set[str]
) -> None:
    if wanted is None and not excluded:
        return
    known = {e.name for e in installed} | {_distribution(e)[0] for e in installed}
    unknown = sorted(((wanted or set()) | excluded) - known)
    note = f"{FILTER_ENV}={os.environ.get(FILTER_ENV, '')!r} limits the plugins loaded"
    if unknown:
        note += f"; it names {', '.join(map(repr, unknown))}, which no installed plugin is called"
    registry.filter_note = note


def _load(registry: Registry, name: str, distribution: str, version: str, source: Any) -> Any:
    """Import and register one plugin with pluggy; returns (record, plugin) or None when it is broken."""
    record = PluginRecord(name, distribution, version)
    registry.plugins.append(record)
    try:
        plugin = source.load() if isinstance(source, metadata.EntryPoint) else source
    except Exception as exc:
        record.error = f"could not be imported: {type(exc).__name__}: {exc}"
        return None
    if registry.manager.is_registered(plugin):
        return None  # one module behind two entry points
    problem = _hook_problem(plugin)
    if problem is not None:
        record.error = problem
        return None
    try:
        registry.manager.register(plugin, name=f"{distribution}:{name}")
    except pluggy.PluginValidationError as exc:
        record.error = f"invalid hook implementation: {exc}"
        return None
    return record, plugin


def _hook_problem(plugin: Any) -> str | None:
    """Hooks pluggy would ignore or keep pending: a `dgrun_*` function without @hookimpl, a misspelt name."""
    specs = [name for name in dir(hookspecs) if name.startswith("dgrun_")]
    for attribute in dir(plugin):
        if not attribute.startswith("dgrun_"):
            continue
        value = getattr(plugin, attribute, None)
        if not callable(value):
            continue
        if attribute not in specs:
            close = difflib.get_close_matches(attribute, specs, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; dgrun's hooks: {', '.join(specs)}"
            return f"defines {attribute!r}, which is not a dgrun hook{hint}"
        if not hasattr(value, "dgrun_impl"):
            return f"{attribute!r} lacks the @dgrun.hookimpl marker, so pluggy would never call it"
    return None


def _collect(registry: Registry, record: PluginRecord, plugin: Any) -> None:
    """Call this plugin's registration hook through pluggy, checking each optimizer it registers."""
    impls = [i for i in registry.manager.hook.dgrun_register_optimizers.get_hookimpls() if i.plugin is plugin]
    found: list[type[Optimizer]] = []

    def register(cls: Any) -> None:
        problem = registration_problem(cls)
        if problem:
            raise TypeError(problem)
        found.append(cls)

    try:
        for impl in impls:
            impl.function(**{arg: register for arg in impl.argnames})
    except Exception as exc:
        record.error = f"raised while registering its optimizers: {type(exc).__name__}: {exc}"
        return
    for cls in found:
        info = OptimizerInfo(cls, record.name, record.distribution, record.version)
        existing = registry.optimizers.get(cls.name)
        if existing is not None and existing.cls is not cls:
            registry.clashes.setdefault(cls.name, [existing]).append(info)
            continue
        registry.optimizers[cls.name] = info
        if cls.name not in record.optimizers:
            record.optimizers.append(cls.name)


def registration_problem(cls: Any) -> str | None:
    """What is wrong with something passed to `register()`, saying what to change; None when it is fine."""
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        return f"register() takes an Optimizer subclass, got {cls!r}"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not STEP_NAME.match(name):
        return f"{cls.__name__}.name must be a snake_case step name (like 'my_cache'), got {name!r}"
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, StepParams)):
        return f"{cls.__name__}.Params must subclass dgrun.StepParams (closed and strict), got {params!r}"
    config = params.model_config
    if config.get("extra") != "forbid" or not config.get("strict"):
        return f"{cls.__name__}.Params must stay closed and strict: keep StepParams' model_config"
    return None


def _check_rules(registry: Registry) -> None:
    """Rules naming steps or tags nothing installed provides: warnings on the plugin that wrote them."""
    names = set(registry.optimizers) | set(registry.clashes)
    tags = set(BUILTIN_TAGS) | {tag for info in registry.optimizers.values() for tag in info.cls.tags}
    records = {(p.distribution, p.name): p for p in registry.plugins}
    for info in registry.optimizers.values():
        cls = info.cls
        for kind in ("conflicts", "after", "before"):
            for rule in getattr(cls, kind):
                known = rule[1:] in tags if rule.startswith("#") else rule in names
                if not known:
                    what = "tag" if rule.startswith("#") else "step"
                    records[(info.distribution, info.plugin)].warnings.append(
                        f"{cls.name}.{kind} names the {what} {rule!r}, which no installed plugin provides"
                    )
