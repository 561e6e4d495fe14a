"""`dgrun serve` for real: a server process on a free loopback port, called with httpx and with the
official `openai` client, and then hurt (a full queue, a killed worker, SIGTERM with requests in flight).

Every request goes to 127.0.0.1 and every loop is bounded in count and time.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from typer.testing import CliRunner

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import KEY, PROMPT, Server, pixels, start_server, stop_server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    running = start_server(
        tmp_path_factory.mktemp("serve"),
        "--workers",
        "2",
        "--threads",
        "1",
        "--max-batch",
        "4",
        "--batch-window-ms",
        "150",
        "--queue",
        "8",
    )
    yield running
    stop_server(running)


# ----------------------------------------------------------------------------------------- the API
def test_health_models_and_recipe(server):
    health = httpx.get(server.url + "/health", timeout=30).json()
    assert health["status"] == "ready" and [w["ready"] for w in health["workers"]] == [True, True]
    assert server.get("/v1/models").json()["data"][0]["id"] == "served"
    record = server.get("/v1/recipe").json()
    assert record["recipe"]["name"] == "served" and isinstance(record["plan"], list)
    assert record["runtime"]["threads"] == 1


def test_the_official_openai_client_works_unchanged(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    result = client.images.generate(
        model="served", prompt=PROMPT, n=2, size="64x64", response_format="b64_json", extra_body={"seed": 7}
    )
    assert len(result.data) == 2
    first = base64.b64decode(result.data[0].b64_json)
    assert pixels(first).shape == (64, 64, 3)
    assert result.data[0].model_extra["dgrun"]["seed"] == 7
    with pytest.raises(openai.BadRequestError, match="url"):
        client.images.generate(model="served", prompt=PROMPT, response_format="url")
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="someone-else", prompt=PROMPT)
    unauthorized = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        unauthorized.images.generate(model="served", prompt=PROMPT)


def test_a_served_image_has_the_pixels_of_dgrun_run_and_reproduces(server, tmp_path):
    from dgrun.cli import app
    from dgrun.testing import run_recipe_data

    response = server.post("/v1/generate", {"prompt": PROMPT, "seed": 0})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-dgrun-seed"] == "0" and response.headers["x-dgrun-batch-size"] == "1"
    record = run_recipe_data(
        tmp_path,
        {"model": {"id": "dgrun:default"}, "generate": {"steps": 4, "threads": 1}, "prompts": [PROMPT]},
    )
    ran = (tmp_path / "outputs" / "test" / record["images"][0]["file"]).read_bytes()
    assert np.array_equal(pixels(response.content), pixels(ran))
    (tmp_path / "served.png").write_bytes(response.content)
    result = CliRunner().invoke(
        app, ["reproduce", str(tmp_path / "served.png"), "--out", str(tmp_path / "again")]
    )
    assert result.exit_code == 0, result.output


def test_bad_requests_never_reach_a_worker(server):
    before = server.get("/v1/recipe").json()
    cases = [
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": PROMPT, "seed": -1}, 400, "seed"),
        ({"prompt": PROMPT, "size": "63x64"}, 400, "size"),
        ({"prompt": PROMPT, "unknown": 1}, 400, "unknown"),
        ({"prompt": "x" * 5000}, 400, "prompt"),
    ]
    for body, status, param in cases:
        response = server.post("/v1/generate", body)
        assert response.status_code == status, body
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and param in (error["param"] or "")
    assert server.post("/v1/generate", {"prompt": "x"}, content=b"[" * 70000).status_code in (400, 413)
    no_key = httpx.post(server.url + "/v1/generate", json={"prompt": PROMPT}, timeout=30)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # open, like /metrics
    assert server.get("/v1/recipe").json()["workers"] == before["workers"]


# -------------------------------------------------------------------------------------- scheduling
def _concurrently(server: Server, count: int, body: dict | None = None) -> list[httpx.Response]:
    with ThreadPoolExecutor(count) as pool:
        futures = [
            pool.submit(server.post, "/v1/generate", body or {"prompt": PROMPT, "seed": i})
            for i in range(count)
        ]
        return [f.result() for f in futures]


def test_concurrent_requests_are_batched_and_spread_least_busy(server):
    responses = _concurrently(server, 6)
    assert all(r.status_code == 200 for r in responses)
    assert {r.headers["x-dgrun-seed"] for r in responses} == {str(i) for i in range(6)}
    assert max(int(r.headers["x-dgrun-batch-size"]) for r in responses) > 1
    assert {r.headers["x-dgrun-worker"] for r in responses} == {"0", "1"}


@pytest.mark.parametrize("strategy", ["round_robin", "random"])
def test_other_strategies_serve_concurrent_requests(strategy, tmp_path):
    running = start_server(tmp_path, "--workers", "2", "--threads", "1", "--strategy", strategy)
    try:
        responses = _concurrently(running, 6)
        assert all(r.status_code == 200 for r in responses)
        workers = [r.headers["x-dgrun-worker"] for r in responses]
        assert set(workers) <= {"0", "1"}
        if strategy == "round_robin":
            assert workers.count("0") == workers.count("1") == 3
    finally:
        stop_server(running)


def test_a_full_queue_answers_429_with_retry_after(server):
    responses = _concurrently(server, 24)
    codes = [r.status_code for r in responses]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] and refused.json()["error"]["type"] == "rate_limit_error"
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'dgrun_requests_total{endpoint="/v1/generate",status="429"}' in metrics


# ------------------------------------------------------------------------------------------- faults
def test_a_killed_worker_comes_back_while_the_other_serves(server):
    pid = httpx.get(server.url + "/health", timeout=30).json()["workers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health", timeout=30).json()["workers"][0]["pid"] == pid:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    served = server.post("/v1/generate", {"prompt": PROMPT})
    assert served.status_code == 200 and served.headers["x-dgrun-worker"] == "1"
    deadline = time.monotonic() + 240
    while httpx.get(server.url + "/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the worker did not come back"
        time.sleep(0.5)
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert "dgrun_worker_restarts_total 1.0" in metrics


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(server):
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(server.post, "/v1/generate", {"prompt": PROMPT, "seed": i}) for i in range(4)]
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 4
    assert server.process.wait(120) == 0, "".join(server.log)
    assert json.dumps(server.log).count("Traceback") == 0
