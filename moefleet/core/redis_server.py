"""A throw-away ``redis-server`` on loopback, for local mode and tests.

``RedisServer()`` starts a real ``redis-server`` bound to 127.0.0.1 on a free
port, without persistence, and returns once it answers PING. It generates a
password (``requirepass``) unless told otherwise: the password lives in the
server's config file and in ``password_file``, both readable by this user only
(mode 0600 in a 0700 directory), never on a command line. ``url`` carries it
(``redis://:PASSWORD@127.0.0.1:PORT/0``); print ``safe_url`` instead. With
``tls=RedisTLS(cert, key, ca)`` the server speaks only TLS and ``url`` is a
``rediss://`` URL that names the CA.

It speaks to Redis over a raw socket, so this module does not import ``redis``
(only the ``moefleet.core.state`` package does).

    with RedisServer() as server:
        store = StateStore(server.url)
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from moefleet.core.secrets import generate_secret, redact_url, write_private_file

__all__ = ["RedisServer", "RedisServerError", "RedisServerNotFound", "RedisTLS", "find_redis_server", "free_port"]

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


@dataclass(frozen=True)
class RedisTLS:
    """PEM files for a TLS-only server: its certificate chain and key, and the CA clients verify it with."""

    cert_file: str
    key_file: str
    ca_file: str


def _command(*args: str) -> bytes:
    """One RESP command (array of bulk strings): safe for any bytes in a password."""
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _connect(port: int, timeout_s: float, tls: RedisTLS | None) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout_s)
    if tls is None:
        return sock
    ctx = ssl.create_default_context(cafile=tls.ca_file)
    return ctx.wrap_socket(sock, server_hostname=HOST)


def _exchange(port: int, request: bytes, done, timeout_s: float, tls: RedisTLS | None) -> bytes:
    """Send ``request`` to 127.0.0.1:port and read until ``done(data)``; b"" if nothing answers."""
    try:
        with _connect(port, timeout_s, tls) as s:
            s.sendall(request)
            data = b""
            while not done(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data
    except (OSError, ssl.SSLError):
        return b""


def _auth(password: str | None) -> bytes:
    return _command("AUTH", password) if password else b""


def _ping(port: int, timeout_s: float = 0.5, password: str | None = None, tls: RedisTLS | None = None) -> bool:
    """True if something on 127.0.0.1:port answers a RESP PING with +PONG (after AUTH when a password is given)."""
    data = _exchange(port, _auth(password) + _command("PING"), lambda d: b"PONG" in d or b"-" in d, timeout_s, tls)
    return b"+PONG" in data


def _server_pid(port: int, timeout_s: float = 0.5, password: str | None = None, tls: RedisTLS | None = None) -> int | None:
    """``process_id`` from ``INFO server`` of the Redis on 127.0.0.1:port; None if none answers."""
    data = _exchange(
        port, _auth(password) + _command("INFO", "server"),
        lambda d: (b"process_id:" in d and d.endswith(b"\r\n")) or d.startswith(b"-") or b"\r\n-" in d,
        timeout_s, tls,
    )
    if not data:
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
        password: True (default) generates one; a string sets it; False or None
            starts a server without a password (any local user could then rewrite
            the fleet's state).
        tls: serve TLS only (``rediss://``) with these files.
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
        password: str | bool | None = True,
        tls: RedisTLS | None = None,
    ):
        self.executable = executable or find_redis_server()
        self._tmpdir = None if dir is not None else tempfile.mkdtemp(prefix="moefleet-redis-")
        self.dir = Path(dir if dir is not None else self._tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "redis-server.log"
        self._proc: subprocess.Popen | None = None
        self.tls = tls
        self.password: str | None = generate_secret() if password is True else (password or None)
        self.config_path = self.dir / "redis.conf"
        self.password_file: Path | None = None
        conf = f"requirepass {self.password}\n" if self.password else ""
        write_private_file(self.config_path, conf)  # the password never appears on a command line
        if self.password:
            self.password_file = write_private_file(self.dir / "password", self.password + "\n")
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
        if self.tls is None:
            ports = ["--port", str(self.port)]
        else:
            ports = [
                "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls.cert_file,
                "--tls-key-file", self.tls.key_file, "--tls-ca-cert-file", self.tls.ca_file, "--tls-auth-clients", "no",
            ]
        return [
            self.executable,
            str(self.config_path),
            "--bind", HOST,
            *ports,
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
            if _server_pid(self.port, password=self.password, tls=self.tls) == self._proc.pid:
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
        """``redis://:PASSWORD@127.0.0.1:PORT/0`` (``rediss://...?ssl_ca_certs=CA`` with TLS). Holds the password: log ``safe_url``."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}{HOST}:{self.port}/0"
        return f"rediss://{auth}{HOST}:{self.port}/0?ssl_ca_certs={quote(self.tls.ca_file)}&ssl_cert_reqs=required"

    @property
    def safe_url(self) -> str:
        """``url`` with the password replaced by ``***``."""
        return redact_url(self.url)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and _ping(self.port, password=self.password, tls=self.tls)

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
        return f"RedisServer({self.safe_url}, pid={self.pid}, {state})"
