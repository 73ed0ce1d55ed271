"""Helpers of the pipeline tests (imported by name: conftest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from dino_core import DINOConfig, build_dino


@functools.cache
def meta_parameter_count(model: DINOConfig) -> int:
    """Build the detector ``model`` describes on the meta device (no memory, no init); its parameter count.

    Cached: many composed configs share a model.
    """
    with torch.device("meta"):
        detector = build_dino(model)
    return sum(p.numel() for p in detector.parameters())


CLIENT_ENV = {"RAY_AUTH_MODE": "token"}
"""What a process that joins :func:`running_ray_cluster`'s cluster by address needs in its environment."""


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process_group(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM the process group ``process`` leads (``start_new_session=True``); SIGKILL after
    ``timeout_s`` seconds."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def running_ray_cluster(log: Path, num_cpus: int = 2) -> Iterator[str]:
    """A Ray cluster started as an operator starts one (``ray start --head``), in its own process group,
    stopped as a group; yields its address (``IP:port``) for ``ray.address=`` / ``RAY_ADDRESS``.

    Ray 2.60 starts it with token authentication (the token in ~/.ray/auth_token): a process that joins it
    by address needs ``RAY_AUTH_MODE=token`` (:data:`CLIENT_ENV`).

    Its session lives in a temporary directory of its own: ``ray start`` records its address there, not in
    /tmp/ray, where any ``ray.init()`` on this machine (other tests) would otherwise join it.
    """
    port, client_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    ray = Path(sys.executable).with_name("ray")
    command = [
        str(ray), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
        "--include-dashboard=false", f"--ray-client-server-port={client_port}", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **CLIENT_ENV}
    env.pop("RAY_ADDRESS", None)
    with log.open("w") as output:
        head = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"--address='([^']+)'", log.read_text())):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield found.group(1)
    finally:
        stop_process_group(head, timeout_s=90)
        shutil.rmtree(temp_dir, ignore_errors=True)
