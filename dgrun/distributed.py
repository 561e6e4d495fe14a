"""Data parallelism under the launchers people already use: torchrun, accelerate launch, Slurm + torchrun.

dgrun has no launcher of its own: a launcher starts one `python -m dgrun RECIPE` per rank and sets
RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). Every rank runs the same plan and makes the
images of its own prompts: prompt i goes to rank i % world_size. Sharding is by prompt, not by image,
because a prompt's images share one seeded generator — that is what keeps the images byte-identical to a
1-process run. We shard ourselves rather than use accelerate's `split_between_processes`, whose padding
repeats the last prompt.

The process group is created lazily (only when a run starts) so that `dgrun check` and `--help` never
import torch. Object collectives always go through a gloo group, so they work on CPU and beside NCCL.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dgrun.errors import DgrunError, RecipeError, RunError, UsageError

T = TypeVar("T")
TIMEOUT_ENV = "DGRUN_DIST_TIMEOUT"
# Ranks meet only at the start and at the end, so a collective may wait for the slowest rank's whole share.
DEFAULT_TIMEOUT_S = 1800.0


class RankTerminated(RunError):
    """The launcher stopped this rank (SIGTERM), usually because another rank died."""


def launch_rank(environ: dict[str, str] | None = None) -> int:
    """This process's rank from the launcher's environment (0 when not launched); never imports torch."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get("RANK", "0"))
    except ValueError:
        return 0


def shard(items: list[T], key: Any, rank: int, world_size: int) -> list[T]:
    """The items whose `key(item)` (a prompt index) belongs to `rank`: index % world_size == rank."""
    return [item for item in items if key(item) % world_size == rank]


@dataclass
class Distributed:
    """Where this process stands in a launch; a 1-process run is `world_size == 1` and does no collectives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    started_group: bool = False
    _cpu_group: Any = field(default=None, repr=False)
    _previous_sigterm: Any = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Distributed:
        """Read RANK / WORLD_SIZE / LOCAL_RANK as torchrun and accelerate launch set them."""
        env = os.environ if environ is None else environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
            timeout = float(env.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        except ValueError as exc:
            raise UsageError(f"launcher environment: {exc}") from None
        if world < 1 or not 0 <= rank < world:
            raise UsageError(f"launcher environment: RANK={rank} is not within WORLD_SIZE={world}")
        if world > 1 and not env.get("MASTER_ADDR"):
            raise UsageError("WORLD_SIZE > 1 without MASTER_ADDR: start dgrun with torchrun")
        return cls(rank=rank, world_size=world, local_rank=local, timeout_s=timeout)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --------------------------------------------------------------------------------------- set up
    def device(self, wanted: str) -> str:
        """The device this rank uses: `cuda:LOCAL_RANK` for auto/cuda on a CUDA machine, else as asked."""
        if not self.active or wanted not in ("auto", "cuda"):
            return wanted
        import torch

        if not torch.cuda.is_available():
            return wanted
        index = self.local_rank % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(index)
        return f"cuda:{index}"

    def start(self, device_kind: str) -> None:
        """Join the process group (gloo on CPU, nccl on CUDA) unless a library already made one."""
        if not self.active:
            return
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=self.timeout_s)
        if not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if device_kind == "cuda" else "gloo"
            try:
                dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
            except Exception as exc:  # any rendezvous failure: one clear message
                raise RunError(f"rank {self.rank}: cannot join the process group: {exc}") from exc
            self.started_group = True
        if dist.get_world_size() != self.world_size:
            raise RunError(
                f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE is {self.world_size}"
            )
        backend_name = str(dist.get_backend())
        self._cpu_group = None if backend_name == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)

    def close(self) -> None:
        """Leave the process group if dgrun created it."""
        if not self.started_group:
            return
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        self.started_group = False
        with contextlib.suppress(Exception):
            signal.signal(signal.SIGTERM, self._previous_sigterm or signal.SIG_DFL)

    # ---------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            self._collective(lambda: dist.barrier(group=self._cpu_group))

    def broadcast(self, value: T | None) -> T:
        """Rank 0's `value` on every rank (picklable objects)."""
        if not self.active:
            return value  # type: ignore[return-value]
        import torch.distributed as dist

        box = [value]
        self._collective(lambda: dist.broadcast_object_list(box, src=0, group=self._cpu_group))
        return box[0]  # type: ignore[return-value]

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(values, value, group=self._cpu_group))
        return values

    def _collective(self, action: Any) -> None:
        try:
            action()
        except DgrunError:
            raise
        except Exception as exc:  # gloo: a dead peer is a RuntimeError/DistBackendError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunError(
                f"rank {self.rank}: another rank stopped answering ({first}); "
                "finished images are kept, `--resume` continues"
            ) from exc


def verdict(dist: Distributed, check: Any) -> Any:
    """Run `check()` on rank 0 only and give every rank its result, or make every rank raise its error.

    Output-directory checks touch the file system; doing them once avoids races between ranks and makes
    all ranks fail alike with rank 0's message.
    """
    if not dist.active:
        return check()
    outcome: tuple[str, Any] = ("ok", None)
    failure: BaseException | None = None
    if dist.is_main:
        try:
            outcome = ("ok", check())
        except Exception as exc:  # every rank must hear of it, or the others wait
            failure = exc
            outcome = ("usage" if isinstance(exc, (UsageError, RecipeError)) else "run", str(exc))
    kind, value = dist.broadcast(outcome)
    if failure is not None:
        raise failure
    if kind == "usage":
        raise UsageError(value)
    if kind == "run":
        raise RunError(value)
    return value


def _raise_terminated(signum: int, frame: Any) -> None:
    raise RankTerminated(
        "stopped by the launcher (SIGTERM), most likely because another rank failed; "
        "finished images are kept, `--resume` continues"
    )


def merge_rank_reports(
    dist: Distributed,
    mine: dict[str, Any],
    made: list[dict[str, Any]],
    known: list[dict[str, Any]],
    gather: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str, str | None]:
    """Rank 0's view of a finished run: every image once, a summary per rank, the overall status."""
    status, error = mine["status"], mine["error"]
    if not gather:
        return known, [{**mine, "images": len(made)}], status, error
    try:
        everyone = dist.gather({**mine, "images": made})
    except RunError as exc:
        return known, [{**mine, "images": len(made)}], "failed", error or str(exc)
    by_file = {image["file"]: image for image in known}
    for report in everyone:
        by_file.update({image["file"]: image for image in report["images"]})
    images = sorted(by_file.values(), key=lambda e: (e["prompt_index"], e["image_index"]))
    ranks = [{**r, "images": len(r["images"])} for r in everyone]
    bad = [r for r in everyone if r["status"] != "complete"]
    if not bad:
        return images, ranks, status, error
    merged = "failed" if any(r["status"] == "failed" for r in bad) else bad[0]["status"]
    return images, ranks, merged, "; ".join(f"rank {r['rank']}: {r['error']}" for r in bad)
