"""Starting and stopping a real `dgrun serve` process on loopback, for the server tests (local and Ray)."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

KEY = "test-key-123"
PROMPT = "a red circle on a blue background"
RECIPE = f"""\
dgrun: 1
name: served
model: {{id: "dgrun:default"}}
generate: {{steps: 4, threads: 1}}
prompts: ["{PROMPT}"]
"""


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    directory: Path
    log: list[str]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def post(self, path: str, body: dict, timeout: float = 120, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers(), timeout=timeout, **kwargs)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers(), timeout=30)


def start_server(directory: Path, *flags: str, wait: float = 240) -> Server:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "r.yaml").write_text(RECIPE)
    port = [] if "--port" in flags else ["--port", "0"]
    command = [sys.executable, "-m", "dgrun", "serve", "r.yaml", *port, "--api-key", KEY, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    process = subprocess.Popen(
        command, cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def read() -> None:
        for line in process.stdout:
            log.append(line)
            found = re.search(r"ready: (http://127\.0\.0\.1:\d+)", line)
            if found:
                url.append(found.group(1))
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(wait):
        process.kill()
        raise AssertionError("the server did not become ready:\n" + "".join(log))
    return Server(url[0], process, directory, log)


def stop_server(server: Server, wait: float = 60) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(wait)
        except subprocess.TimeoutExpired:
            server.process.kill()
