"""`dgrun serve --ray`: the same app on a local Ray instance (127.0.0.1 only), two CPU replicas of
dgrun:default, called with httpx and the `openai` client; one replica killed, and Ray brings it back."""

from __future__ import annotations

import base64
import os
import signal
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from serve_helpers import KEY, PROMPT, free_port, pixels, start_server, stop_server


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory):
    running = start_server(
        tmp_path_factory.mktemp("ray"),
        "--ray",
        "--replicas",
        "2",
        "--threads",
        "1",
        "--port",
        str(free_port()),
        wait=420,
    )
    yield running
    stop_server(running, wait=120)


def _replica_pids(server, tries: int = 12) -> set[int]:
    return {httpx.get(server.url + "/health", timeout=30).json()["workers"][0]["pid"] for _ in range(tries)}


def test_the_same_api_answers_on_ray(ray_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=ray_server.url + "/v1", api_key=KEY)
    result = client.images.generate(
        model="served", prompt=PROMPT, response_format="b64_json", extra_body={"seed": 0}
    )
    assert pixels(base64.b64decode(result.data[0].b64_json)).shape == (64, 64, 3)
    record = ray_server.get("/v1/recipe").json()
    assert (
        record["recipe"]["name"] == "served"
        and record["served_by"]["replica"]
        and record["served_by"]["node"]
    )
    assert httpx.post(ray_server.url + "/v1/generate", json={"prompt": PROMPT}, timeout=60).status_code == 401
    bad = ray_server.post("/v1/generate", {"prompt": ""})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    assert "dgrun_requests_total" in httpx.get(ray_server.url + "/metrics", timeout=30).text


def test_ray_replicas_give_the_pixels_of_dgrun_run(ray_server, tmp_path):
    from dgrun.testing import run_recipe_data

    served = ray_server.post("/v1/generate", {"prompt": PROMPT, "seed": 0})
    assert served.status_code == 200
    record = run_recipe_data(
        tmp_path,
        {"model": {"id": "dgrun:default"}, "generate": {"steps": 4, "threads": 1}, "prompts": [PROMPT]},
    )
    ran = (tmp_path / "outputs" / "test" / record["images"][0]["file"]).read_bytes()
    assert np.array_equal(pixels(served.content), pixels(ran))


def test_a_killed_replica_is_restarted_while_requests_succeed(ray_server):
    pids = _replica_pids(ray_server)
    assert len(pids) == 2, "the router should reach both replicas"
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    codes = [ray_server.post("/v1/generate", {"prompt": PROMPT, "seed": i}).status_code for i in range(6)]
    assert codes == [200] * 6
    deadline = time.monotonic() + 240
    while True:
        now = _replica_pids(ray_server)
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, f"Ray did not restart the replica (pids {now})"
        time.sleep(2)
