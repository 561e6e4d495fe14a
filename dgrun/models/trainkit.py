"""Training plumbing for `dgrun.models.train`: checkpoints, EMA, progress, OpenMP waiting, SD3 attention."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

_PAD_TOKENS = 256  # zero "T5" tokens StableDiffusion3Pipeline appends by default (max_sequence_length)


class Checkpoint:
    """One phase's state in the work folder, written atomically and ignored when the budget differs.

    It also carries the phase's training time, so a resumed run still reports what the phase cost in all.
    """

    def __init__(self, work: Path, phase: str, key: dict[str, Any], version: int):
        self.path = work / f"{phase}.pt"
        self.key = {"version": version, **key}
        self.earlier = 0.0  # seconds spent on this phase by earlier runs
        self.began = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.began

    def load(self) -> dict[str, Any] | None:
        import torch

        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("key") != self.key:
            return None
        self.earlier, self.began = float(state.get("seconds", 0.0)), time.perf_counter()
        return state

    def save(self, **state: Any) -> None:
        import torch

        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        torch.save({"key": self.key, "seconds": self.seconds, **state}, partial)
        partial.replace(self.path)


class Ema:
    """Exponential moving average of parameters; evaluation and the shipped weights use the average."""

    def __init__(self, modules: list[Any], decay: float = 0.999):
        self.decay = decay
        self.models = [copy.deepcopy(m).requires_grad_(False).eval() for m in modules]
        self._live = [p for m in modules for p in m.parameters()]
        self._avg = [p for m in self.models for p in m.parameters()]

    def update(self, step: int) -> None:
        import torch

        decay = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self._avg, self._live, 1 - decay)

    def state_dict(self) -> list[dict[str, Any]]:
        return [m.state_dict() for m in self.models]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for model, state in zip(self.models, states, strict=True):
            model.load_state_dict(state)


class Console:
    """A rich progress bar for the current phase, with evaluation lines printed above it.

    `spent` collects each phase's training seconds (across resumed runs) for the report.
    """

    def __init__(self) -> None:
        from rich.console import Console as RichConsole

        self.console = RichConsole()
        self.spent: dict[str, float] = {}

    def progress(self) -> Any:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        return Progress(
            TextColumn("[bold]{task.description:<7}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
        )

    def print(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)  # a log file keeps whole lines

    def advance(self, bar: Any, task: Any, info: str) -> None:
        """Move the bar; without a terminal (a log file) also print a plain line every 100 steps."""
        bar.update(task, advance=1, info=info)
        current = next(t for t in bar.tasks if t.id == task)
        if not self.console.is_terminal and (current.completed % 100 == 0 or current.finished):
            elapsed = current.elapsed or 0.0
            self.print(
                f"{current.description} {current.completed:.0f}/{current.total:.0f} {elapsed:.0f} s {info}"
            )


def optimize(optimizer: Any, loss: Any, lr: float) -> None:
    import torch

    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()


def due(step: int, total: int, every: int) -> bool:
    return (step + 1) % every == 0 or step + 1 == total


class PadBiasJointAttention:
    """SD3 joint attention where the last context token stands for `_PAD_TOKENS` identical zero tokens.

    The pipeline appends 256 all-zero "T5" tokens; identical tokens stay identical through every block, so
    attending to N copies equals attending to one copy with log(N) added to its logit. Training with one
    token and that bias is exact for the pipeline's default, at a fraction of the cost of 256 real tokens.
    """

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, **_: Any) -> Any:
        import torch
        import torch.nn.functional as F

        batch, image_tokens = hidden_states.shape[:2]

        def heads(x: Any) -> Any:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query = heads(attn.to_q(hidden_states))
        key = heads(attn.to_k(hidden_states))
        value = heads(attn.to_v(hidden_states))
        query = torch.cat([query, heads(attn.add_q_proj(encoder_hidden_states))], dim=2)
        key = torch.cat([key, heads(attn.add_k_proj(encoder_hidden_states))], dim=2)
        value = torch.cat([value, heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
        bias = query.new_zeros(key.shape[2])
        bias[-1] = math.log(_PAD_TOKENS)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias[None, :])
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1])
        image, context = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context
