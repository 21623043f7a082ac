"""A throw-away ``redis-server`` on loopback, for local mode and tests.

``RedisServer()`` starts a real ``redis-server`` bound to 127.0.0.1 on a free
port, without persistence, and returns once it answers PING. It speaks to
Redis over a raw socket, so this module does not import ``redis`` (only
``moefleet.core.state`` does).

    with RedisServer() as server:
        store = StateStore(server.url)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

__all__ = ["RedisServer", "RedisServerError", "RedisServerNotFound", "find_redis_server", "free_port"]

HOST = "127.0.0.1"


class RedisServerError(RuntimeError):
    """redis-server could not be started or did not come up."""


class RedisServerNotFound(RedisServerError):
    """No redis-server executable."""


def find_redis_server() -> str:
    """Path of the ``redis-server`` executable: ``$MOEFLEET_REDIS_SERVER`` if set, else from PATH.

    Raises:
        RedisServerNotFound: with how to install it.
    """
    explicit = os.environ.get("MOEFLEET_REDIS_SERVER")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise RedisServerNotFound(f"MOEFLEET_REDIS_SERVER={explicit!r} is not an executable file")
    path = shutil.which("redis-server")
    if path is None:
        raise RedisServerNotFound(
            "redis-server not found on PATH; install it (Debian/Ubuntu: `apt-get install redis-server`, "
            "macOS: `brew install redis`) or set MOEFLEET_REDIS_SERVER to its path"
        )
    return path


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ping(port: int, timeout_s: float = 0.5) -> bool:
    """True if something on 127.0.0.1:port answers a RESP PING with +PONG."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _server_pid(port: int, timeout_s: float = 0.5) -> int | None:
    """``process_id`` from ``INFO server`` of the Redis on 127.0.0.1:port; None if none answers."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"process_id:" not in data or not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":", 1)[1])
    return None


def _kill(proc: subprocess.Popen, wait_s: float) -> None:
    """Terminate ``proc``; kill it if it has not exited after ``wait_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisServer:
    """A ``redis-server`` subprocess on 127.0.0.1, no persistence, up when the constructor returns.

    Args:
        port: port to listen on; None picks a free one (and retries with another
            if it was taken in the meantime).
        dir: working directory of the server (its log goes there); None uses a
            temporary directory removed by ``stop()``.
        startup_timeout_s: how long to wait for PING to answer.
        executable: the redis-server binary; None uses ``find_redis_server()``.

    Raises:
        RedisServerNotFound: redis-server is not installed.
        RedisServerError: it exited or did not answer in time (the message has its log).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        dir: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 10.0,
        executable: str | None = None,
    ):
        self.executable = executable or find_redis_server()
        self._tmpdir = None if dir is not None else tempfile.mkdtemp(prefix="moefleet-redis-")
        self.dir = Path(dir if dir is not None else self._tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "redis-server.log"
        self._proc: subprocess.Popen | None = None
        self._stopped = False
        attempts = 1 if port is not None else 3
        try:
            for attempt in range(attempts):
                self.port = port if port is not None else free_port()
                try:
                    self._start(startup_timeout_s)
                    break
                except RedisServerError:
                    # A picked port can be taken between free_port() and the bind: try another.
                    if attempt + 1 == attempts or "Address already in use" not in self._log_tail():
                        raise
        except BaseException:
            self.stop()
            raise
        # Kill the server if this object is dropped or the interpreter exits without stop().
        self._finalizer = weakref.finalize(self, _kill, self._proc, 5.0)

    def _argv(self) -> list[str]:
        return [
            self.executable,
            "--bind", HOST,
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.dir),
            "--logfile", "",
            "--loglevel", "warning",
        ]

    def _start(self, timeout_s: float) -> None:
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RedisServerError(
                    f"redis-server ({self.executable}) exited with code {self._proc.returncode} "
                    f"before answering on {HOST}:{self.port}; its output:\n{self._log_tail()}"
                )
            # Identify the answer by pid: another server may already listen on this port.
            if _server_pid(self.port) == self._proc.pid:
                return
            time.sleep(0.02)
        _kill(self._proc, 2.0)
        raise RedisServerError(
            f"redis-server did not answer PING on {HOST}:{self.port} within {timeout_s:.1f}s; "
            f"its output:\n{self._log_tail()}"
        )

    def _log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:] or "(empty)"
        except OSError:
            return "(no log)"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and _ping(self.port)

    def exited(self) -> bool:
        """True when the server process has ended (killed, crashed) and ``stop()`` was not called."""
        return self._proc is not None and self._proc.poll() is not None and not self._stopped

    def restart(self, startup_timeout_s: float = 10.0) -> None:
        """Start the server again on the same port (after it died); it comes back empty (no persistence)."""
        if self._proc is not None:
            _kill(self._proc, 2.0)
        self._start(startup_timeout_s)
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill, self._proc, 5.0)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the server (kill it if it does not exit in ``timeout_s``) and remove the temp dir. Idempotent."""
        self._stopped = True
        if self._proc is not None:
            _kill(self._proc, timeout_s)
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._proc is not None and self._proc.poll() is None else "stopped"
        return f"RedisServer({self.url}, pid={self.pid}, {state})"
