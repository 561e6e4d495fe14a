"""Measuring what a step really did during a run: the counters behind each plan entry's `effect`.

A record that says `applied` is only true if the step changed the work the pipeline did. Steps install
these watchers when they apply and read them once the images are made:
- `SkipWatch`: how often the denoiser ran, and how often a module a cache skips really computed (its
  first parametrised leaf runs only when it computes, whatever hooks wrap the module itself);
- `CompileWatch`: graphs dynamo compiled, recompilations (a compile id `frame/n` with n > 0), graph breaks,
  and whether dynamo gave up at its recompile limit, in which case the model ran mostly eager;
- `count_calls_of`: calls of any function, e.g. the attention backend chosen, or the VAE's tiled decode.
Every watcher only counts; none changes what the pipeline computes.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from dgrun.optimizer import StepEffect


def first_leaf(module: Any) -> Any:
    """The first submodule with its own parameters and no children: it runs only when `module` computes."""
    for child in module.modules():
        if not list(child.children()) and any(True for _ in child.parameters(recurse=False)):
            return child
    return module


class CallCounter:
    """Counts forward calls of one module (pre-hook: counted even when the forward then fails)."""

    def __init__(self, module: Any):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


class SkipWatch:
    """Denoiser calls against computations of the module a cache skips."""

    def __init__(self, denoiser: Any, watched: Any, label: str):
        self.label = label
        self.denoiser = CallCounter(denoiser)
        self.watched = CallCounter(first_leaf(watched))

    def effect(self, unit: str = "passes") -> StepEffect:
        calls, computed = self.denoiser.calls, self.watched.calls
        self.denoiser.remove()
        self.watched.remove()
        counters = {"denoiser_calls": calls, "computed": computed, "watched": self.label}
        if calls == 0:
            return StepEffect(counters, "the denoiser never ran", no_effect="the denoiser never ran")
        per_call = computed / calls
        cached = max(0, calls - computed) if per_call <= 1 else None
        if cached is not None:
            counters["cached"] = cached
            summary = f"{computed} full {unit} and {cached} cached of {calls} denoiser calls ({self.label})"
            if cached == 0:
                return StepEffect(counters, summary, no_effect=f"nothing was cached: {summary}")
            return StepEffect(counters, summary)
        # A module that runs several times per call (one of many attention layers): compare with the rate.
        return StepEffect(counters, f"{self.label} computed {computed} times in {calls} denoiser calls")


class CompileWatch:
    """dynamo's compiles, recompilations and graph breaks from the moment a compile step applies."""

    def __init__(self) -> None:
        from torch._dynamo.callback import callback_handler
        from torch._dynamo.utils import counters

        self.compile_ids: list[str] = []
        self.limit_messages: list[str] = []
        self._counters = counters
        self._breaks_before = sum(counters["graph_break"].values())
        self._graphs_before = counters["stats"]["unique_graphs"]
        self._handler = callback_handler
        self._callback = callback_handler.register_start_callback(self._started)
        self._log = _MessageCatcher(self.limit_messages, "recompile_limit")
        logging.getLogger("torch._dynamo").addHandler(self._log)

    def _started(self, args: Any) -> None:
        self.compile_ids.append(str(getattr(args, "compile_id", "")))

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self._handler.remove_start_callback(self._callback)
        logging.getLogger("torch._dynamo").removeHandler(self._log)

    def effect(self, what: str) -> StepEffect:
        self.close()
        recompiles = sum(1 for cid in self.compile_ids if _frame_compile(cid) > 0)
        breaks = sum(self._counters["graph_break"].values()) - self._breaks_before
        graphs = self._counters["stats"]["unique_graphs"] - self._graphs_before
        limit_hit = bool(self.limit_messages)
        counters = {
            "compiles": len(self.compile_ids),
            "graphs": graphs,
            "recompilations": recompiles,
            "graph_breaks": breaks,
            "recompile_limit_hit": limit_hit,
        }
        summary = f"{graphs} graphs, {recompiles} recompilations, {breaks} graph breaks"
        if not self.compile_ids:
            return StepEffect(counters, summary, no_effect="nothing was compiled")
        if limit_hit:
            warning = (
                f"compile: recompile limit hit ({recompiles} recompilations); {what} ran mostly eager. "
                "Something changes between calls that dynamo guards on (a cache's per-step state?)"
            )
            return StepEffect(counters, summary, warning=warning)
        return StepEffect(counters, summary)


def _frame_compile(compile_id: str) -> int:
    """n of a dynamo compile id `frame/n` (or `!graph/frame/n`); 0 when it cannot be read."""
    try:
        return int(compile_id.rsplit("/", 1)[1].split("_")[0])
    except (IndexError, ValueError):
        return 0


class _MessageCatcher(logging.Handler):
    """Keeps log messages that mention `needle` (dynamo reports its recompile limit only as a warning)."""

    def __init__(self, sink: list[str], needle: str):
        super().__init__(logging.WARNING)
        self.sink = sink
        self.needle = needle

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            message = record.getMessage()
            if self.needle in message:
                self.sink.append(message.splitlines()[0])


class FunctionCounter:
    """Replaces `owner.name` (or `owner[key]`) by a wrapper counting its calls; `restore` undoes it."""

    def __init__(self, owner: Any, name: str | None = None, key: Any = None):
        self.calls = 0
        self.owner, self.name, self.key = owner, name, key
        self.own = key is None and name in vars(owner)  # an attribute of the object itself, not its class
        original = owner[key] if key is not None else getattr(owner, name)
        self.original = original

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        if key is not None:
            owner[key] = counting
        else:
            setattr(owner, name, counting)

    def restore(self) -> None:
        if self.key is not None:
            self.owner[self.key] = self.original
        elif self.own or isinstance(self.owner, type):
            setattr(self.owner, self.name, self.original)
        else:
            with contextlib.suppress(AttributeError):
                delattr(self.owner, self.name)
