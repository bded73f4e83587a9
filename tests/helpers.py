"""Test helpers: synthetic images and waiting for servers. Tests make their own images; no dataset is read."""

from __future__ import annotations

import io
import socket
import time

import numpy as np
import requests
from PIL import Image


def pattern(width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    """A deterministic colourful RGB pattern (gradients + noise), uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    red = (xs * 255 // max(1, width - 1))
    green = (ys * 255 // max(1, height - 1))
    blue = ((xs + ys) * 4) % 256
    noise = rng.integers(0, 40, size=(height, width, 3))
    return (np.stack([red, green, blue], -1) + noise).clip(0, 255).astype(np.uint8)


def encode(pixels: np.ndarray | Image.Image, fmt: str = "PNG", mode: str | None = None, **save_args) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def image_bytes(fmt: str = "PNG", width: int = 64, height: int = 48, seed: int = 0, mode: str | None = None) -> bytes:
    return encode(pattern(width, height, seed), fmt, mode)


def metric_value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mount_secret(folder, keys: str, generation: int) -> None:
    """Write ``keys`` (the file's text) as the kubelet updates a Secret volume: a new timestamped folder, then
    ``..data`` swapped to it by a rename (atomic), while ``keys`` stays a symlink to ``..data/keys``."""
    from pathlib import Path

    folder = Path(folder)
    data = folder / f"..2026_12_03_{generation:02d}"
    data.mkdir()
    (data / "keys").write_text(keys)
    staged = folder / "..data_tmp"
    staged.symlink_to(data.name)
    staged.rename(folder / "..data")
    if not (folder / "keys").is_symlink():
        (folder / "keys").symlink_to("..data/keys")


def wait_until(predicate, what: str, timeout: float = 60.0, interval: float = 0.1):
    """Until ``predicate()`` is true (its value is returned), or an AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for(url: str, status: int = 200, timeout: float = 60.0, process=None) -> requests.Response:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            last = requests.get(url, timeout=2)
            if last.status_code == status:
                return last
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer {status} within {timeout} s (last: {last and last.status_code})")


class GunicornServer:
    """The service as deployed: a real gunicorn master with its config file and worker processes."""

    def __init__(self, tmp_path, gunicorn_args: tuple[str, ...] = (), grpc: bool = False, code=None, **settings):
        """``code``: the checkout whose service/ runs (this one by default; bench/compare.py runs an older one)."""
        import os
        import subprocess
        import sys
        from pathlib import Path

        from service.settings import Settings

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tmp_path) / f"gunicorn-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PORT", "WORKERS", "PROMETHEUS"))}
        self.metrics_dir = Path(tmp_path) / f"metrics-{self.port}"
        self.workers = int(settings.get("WORKERS", Settings().WORKERS))
        # gRPC only where a test asks for it (on a free port of its own): two servers must never share one.
        self.grpc_port = free_port() if grpc else 0
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        env.update(PORT=str(self.port), HOST="127.0.0.1", LOG_LEVEL="INFO",
                   PROMETHEUS_MULTIPROC_DIR=str(self.metrics_dir), GRPC_PORT=str(self.grpc_port))
        env.update({key: str(value) for key, value in settings.items()})
        gunicorn = Path(sys.executable).parent / "gunicorn"
        self._log = self.log_path.open("wb")
        command = [str(gunicorn), "-c", "python:service.gunicorn_config", *gunicorn_args]
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=code or Path(__file__).resolve().parent.parent)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every worker is ready, not just the first to answer /readyz: a sibling still loading its models
        would otherwise hold the aggregated ``convserve_ready`` gauge at 0 and take no share of the requests."""
        deadline = time.monotonic() + timeout
        try:
            wait_for(self.url + "/readyz", 200, timeout, self.process)
            while not self.all_workers_ready():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not every worker was ready within {timeout} s")
                time.sleep(0.1)
        except Exception as exc:
            raise AssertionError(f"{exc}\n--- gunicorn log ---\n{self.log()}") from exc

    def all_workers_ready(self) -> bool:
        """Each live worker has written its readiness gauge, and their minimum (what /metrics reports) is 1."""
        workers = self.worker_pids()
        gauges = {int(name.stem.rsplit("_", 1)[1]) for name in self.metrics_dir.glob("gauge_livemin_*.db")}
        if len(workers) != self.workers or not workers <= gauges:
            return False
        metrics = requests.get(self.url + "/metrics", timeout=5).text
        return "\nconvserve_ready 1.0\n" in "\n" + metrics

    def worker_pids(self) -> set[int]:
        from pathlib import Path

        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return {int(pid) for pid in children.read_text().split()} if children.exists() else set()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
