"""`feast serve` as a managed local process: start on a free port, wait until it answers, stop it.

    with FeatureServer(repo) as server:          # http://127.0.0.1:<free port>
        FeatureClient(repo, http_url=server.url).get_ranking_features(...)

and a throwaway Redis server for a Redis online store (tests, benchmarks): `with RedisServer() as redis: ...`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from feature_store.repo import FeatureRepo, FeatureStoreError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _feast_cli() -> str:
    local = Path(sys.executable).with_name("feast")
    return str(local) if local.exists() else "feast"


class FeatureServer:
    """The real Feast HTTP feature server of a repo, on localhost."""

    def __init__(self, repo: FeatureRepo, port: int | None = None, host: str = "127.0.0.1", start_timeout_s: float = 90.0):
        self.repo, self.host, self.port = repo, host, port or free_port()
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self.log_path = repo.data / f"feast-serve-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [_feast_cli(), "serve", "--host", self.host, "--port", str(self.port), "--no-access-log"]

    def start(self) -> "FeatureServer":
        import requests

        self.repo.store()  # a clear error when apply has not run
        log = open(self.log_path, "w")
        # its own process group, so stopping it also stops any worker it forks
        self.process = subprocess.Popen(self.command(), cwd=self.repo.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FeatureStoreError(f"`feast serve` exited with {self.process.returncode}; its log: {self.log_path}\n{self.log_path.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise FeatureStoreError(f"`feast serve` did not answer on {self.url} within {self.start_timeout_s:.0f} s; its log: {self.log_path}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "FeatureServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer:
    """A throwaway `redis-server` on a free localhost port, nothing saved to disk (tests, benchmarks).

        with RedisServer() as redis:                 # redis.url == "127.0.0.1:<port>", Feast's connection string
            repo.init(online=OnlineStoreConfig("redis", redis.url))
    """

    def __init__(self, port: int | None = None, start_timeout_s: float = 10.0):
        import shutil

        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise FeatureStoreError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "RedisServer":
        import redis

        self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise FeatureStoreError(f"redis-server did not answer on {self.url}") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
