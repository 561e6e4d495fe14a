"""Data parallelism: real `torchrun` / `accelerate launch` 2-process runs on CPU (gloo) vs a 1-process run."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dgrun.distributed import Distributed, launch_rank, shard, verdict
from dgrun.errors import UsageError

RECIPE = """\
dgrun: 1
name: dp
model: {id: "dgrun:tiny-sd"}
generate: {steps: 3}
prompts: [one, two, three, four]
"""
# Rank 1 dies (os._exit) right after its first image: torchrun then stops rank 0 with SIGTERM.
CRASH = """\
import os, sys
from dgrun import runner
from dgrun.cli import main

original = runner.Run._generate

def _generate(self, batch):
    original(self, batch)
    if os.environ.get("RANK") == "1":
        os._exit(3)

runner.Run._generate = _generate
main()
"""
# A stand-in for a model-parallel engine such as xDiT: both ranks make every image together, and only the
# group's last rank gets the images back (None elsewhere), so that rank must be the one that writes.
GROUP_OF_TWO = """\
import os
from dgrun import Optimizer, hookimpl
from dgrun.cli import main
from dgrun.testing import registered_plugin


class LastRankHoldsImages(Optimizer):
    name = "group_of_two"
    ranks_per_image = 2
    image_rank_in_group = 1

    def apply(self, pipe, ctx):
        cls = type(pipe)
        original = cls.__call__

        def __call__(self, *args, **kwargs):
            output = original(self, *args, **kwargs)
            return output if os.environ["RANK"] == "1" else None

        pipe.__class__ = type(cls.__name__, (cls,), {"__call__": __call__})
        return "2 ranks per image"


class Plugin:
    @hookimpl
    def dgrun_register_optimizers(self, register):
        register(LastRankHoldsImages)


with registered_plugin(Plugin()):
    main()
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}"]
    return subprocess.run(
        [*launcher, *rendezvous, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=180
    )


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.png"))}


def _pixels(directory: Path) -> dict[str, bytes]:
    from PIL import Image

    return {p.name: Image.open(p).tobytes() for p in sorted(directory.glob("*.png"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A 1-process run of the recipe: what every multi-process run must reproduce byte for byte."""
    root = tmp_path_factory.mktemp("dp")
    (root / "r.yaml").write_text(RECIPE)
    done = subprocess.run(
        [sys.executable, "-m", "dgrun", "r.yaml", "--out", "one"],
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert len(_hashes(root / "one")) == 4
    return root


def test_two_processes_make_the_same_images_and_one_merged_record(reference):
    done = _torchrun(reference, "-m", "dgrun", "r.yaml", "--out", "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _hashes(reference / "two") == _hashes(reference / "one")
    record = json.loads((reference / "two" / "run.json").read_text())
    assert record["status"] == "complete" and record["world_size"] == 2
    assert [i["file"] for i in record["images"]] == sorted(_hashes(reference / "one"))
    assert [i["rank"] for i in record["images"]] == [0, 1, 0, 1]  # prompt i -> rank i % 2
    assert [r["images"] for r in record["ranks"]] == [2, 2]
    # only rank 0 prints: one header line and one progress bar
    assert done.stdout.count("dp →") == 1 and done.stdout.count("generating") == 1
    assert "rank 0 of 2 makes 2 of 4 images" in done.stdout


def test_accelerate_launch_shards_the_same_way(reference):
    # `--multi_gpu` picks accelerate's torch.distributed launcher, which runs on CPU (gloo) as well;
    # without it, accelerate on a CPU-only machine goes through mpirun.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    done = subprocess.run(
        [*launcher, "--main_process_port", str(_free_port()), "-m", "dgrun", "r.yaml", "--out", "acc"],
        cwd=reference,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _hashes(reference / "acc") == _hashes(reference / "one")
    record = json.loads((reference / "acc" / "run.json").read_text())
    assert record["status"] == "complete" and record["world_size"] == 2
    assert [i["rank"] for i in record["images"]] == [0, 1, 0, 1]


def test_a_dead_rank_fails_the_run_and_resume_finishes_it(reference):
    (reference / "crash.py").write_text(CRASH)
    crashed = _torchrun(reference, "crash.py", "r.yaml", "--out", "three")
    assert crashed.returncode != 0
    record = json.loads((reference / "three" / "run.json").read_text())
    assert record["status"] == "failed" and "another rank" in record["error"]
    assert "--resume" in crashed.stderr
    kept = _hashes(reference / "three")
    assert kept and all(kept[name] == _hashes(reference / "one")[name] for name in kept)

    resumed = _torchrun(reference, "-m", "dgrun", "r.yaml", "--out", "three", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _hashes(reference / "three") == _hashes(reference / "one")
    record = json.loads((reference / "three" / "run.json").read_text())
    assert record["status"] == "complete" and len(record["images"]) == 4
    assert len({i["file"] for i in record["images"]}) == 4


def test_a_model_parallel_group_writes_from_the_rank_holding_the_images(reference):
    (reference / "group.py").write_text(GROUP_OF_TWO)
    (reference / "g.yaml").write_text(RECIPE + "optimize: [group_of_two]\n")
    done = _torchrun(reference, "group.py", "g.yaml", "--out", "group")
    assert done.returncode == 0, done.stderr[-3000:]
    # the PNGs carry their recipe, which names the extra step: compare pixels
    assert _pixels(reference / "group") == _pixels(reference / "one")
    record = json.loads((reference / "group" / "run.json").read_text())
    assert record["status"] == "complete" and record["world_size"] == 2
    assert [i["rank"] for i in record["images"]] == [1, 1, 1, 1]  # one group: every prompt, rank 1 writes
    assert [r["images"] for r in record["ranks"]] == [0, 4]


# ------------------------------------------------------------------------------- no launcher needed
def test_prompts_are_sharded_round_robin_without_padding():
    items = list(range(5))
    shards = [shard(items, lambda i: i, rank, 2) for rank in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]
    assert shard(items, lambda i: i, 3, 4) == [3]
    assert shard([0], lambda i: i, 1, 2) == []  # more ranks than prompts: nothing, not a repeat


def test_the_launcher_environment_is_read_and_checked():
    single = Distributed.from_env({})
    assert not single.active and single.is_main
    launched = Distributed.from_env(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}
    )
    assert (launched.rank, launched.world_size, launched.local_rank) == (3, 4, 1)
    assert launch_rank({"RANK": "2"}) == 2 and launch_rank({}) == 0
    with pytest.raises(UsageError, match="not within"):
        Distributed.from_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x"})
    with pytest.raises(UsageError, match="MASTER_ADDR"):
        Distributed.from_env({"RANK": "0", "WORLD_SIZE": "2"})


def test_single_process_needs_no_process_group():
    single = Distributed()
    assert single.device("auto") == "auto"
    assert single.gather(7) == [7] and single.broadcast("x") == "x"
    assert verdict(single, lambda: 42) == 42
    single.barrier()
    single.close()
