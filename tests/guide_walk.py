"""Walk deploy/README.md section 2 on one machine, with the guide's own commands: a one-node Ray cluster on loopback.

The commands are the guide's fenced blocks marked ``<!-- guide-step: NAME -->``, run as written in a bash
whose exports carry from step to step, with these changes only, each of which must apply (so the guide
cannot drift from what is run) and none of which a user needs:

* ``HOME`` is a fresh directory: Ray's token, the secrets and Redis's files land there, not in the
  user's own ``~/.ray`` or ``~/.config``;
* ``HEAD_HOST=localhost``, ``HEAD_IP=127.0.0.1``: the guide's values for one machine;
* every fixed port is a free one, so walks of other checkouts on the same machine never collide:
  Redis's 6380, Ray's GCS 6379 and the dashboard's 8265 (and ``ray start`` gets its own dashboard,
  dashboard agent and Ray Client ports and temp dir, which it otherwise fixes too), the fleet's
  gRPC port 9000, Serve's HTTP port and the telemetry port 8470;
* ``moe-fleet deploy`` binds 127.0.0.1 (``--host``): the walk serves nothing beyond loopback
  (Serve's own inter-replica gRPC servers still bind every interface, on random ports);
* ``/models/mixtral-8x7b-v0.1`` is a tiny Mixtral checkpoint.

``GuideWalk.stop()`` stops what the walk started and nothing else: the processes of the session the
walk's ``ray start`` ran in (Ray's daemons, its workers and actors) and the Redis whose pid file the
walk's Redis wrote.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "deploy" / "README.md"
SECTION = ("## 2. A Ray cluster on machines you manage", "## 3. Ray cluster launcher")
STEP = re.compile(r"<!-- guide-step: (?P<name>[a-z-]+) -->\n```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)
GUIDE_CHECKPOINT = "/models/mixtral-8x7b-v0.1"
STEPS = ("redis", "secrets", "head", "controller-config", "deploy", "check", "client")


def guide_steps(text: str | None = None) -> dict[str, tuple[str, str]]:
    """The marked blocks of section 2: name -> (language, body)."""
    text = GUIDE.read_text() if text is None else text
    section = text[text.index(SECTION[0]): text.index(SECTION[1])]
    return {m["name"]: (m["lang"], m["body"]) for m in STEP.finditer(section)}


def commands(body: str) -> list[str]:
    """A bash block's commands, one per entry: continued lines (``\\``, ``&&``, an open parenthesis) joined;
    comment lines dropped (a trailing comment stays: bash ignores it)."""
    out, current, depth = [], "", 0
    for line in body.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line + "\n"
        code = line.split(" #")[0] if "'" not in line and '"' not in line else line
        depth += code.count("(") - code.count(")")
        if depth > 0 or line.rstrip().endswith(("\\", "&&", "|")):
            continue
        out.append(current.rstrip("\n"))
        current, depth = "", 0
    if current:
        out.append(current.rstrip("\n"))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (from /proc), this process excluded."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid:
            out.append(int(entry.name))
    return out


@dataclass
class Ran:
    command: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class GuideWalk:
    """One walk: its directory, ports, substitutions, the steps run so far and what to stop."""

    checkpoint: str
    extra: list[tuple[str, str]] = field(default_factory=list)  # the caller's own changes (e.g. a shorter demo), first
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mfguide-")))  # short: Ray's socket paths
    ran: list[Ran] = field(default_factory=list)

    def __post_init__(self):
        self.home = self.work / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in ("redis", "gcs", "dashboard", "agent", "client", "grpc", "serve_http", "http")}
        p = self.ports
        self.ray_session: int | None = None
        self.env_file = self.work / "env.sh"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "MOEFLEET_")) and k not in ("HOME", "PYTHONPATH")}
        env.update(HOME=str(self.home), HEAD_HOST="localhost", HEAD_IP="127.0.0.1", COLUMNS="160",
                   PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   PYTHONUNBUFFERED="1")
        self.env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
        self.base_env = {"PATH": env["PATH"], "HOME": str(self.home)}
        self.substitutions = [*self.extra,
            (":6380", f":{p['redis']}"),
            ("port 6380", f"port {p['redis']}"),
            ("--port=6379", f"--port={p['gcs']}"),
            ("--node-ip-address=$HEAD_IP", f"--node-ip-address=$HEAD_IP --temp-dir={self.work}/ray "
                                            f"--dashboard-port={p['dashboard']} --dashboard-agent-listen-port={p['agent']} "
                                            f"--ray-client-server-port={p['client']} --disable-usage-stats"),
            ("http://127.0.0.1:8265", f"http://127.0.0.1:{p['dashboard']}"),
            ("--workers 2", f"--workers 2 --host 127.0.0.1 --grpc-port {p['grpc']} --serve-http-port {p['serve_http']} "
                            f"--http-port {p['http']}"),
            (":9000", f":{p['grpc']}"),
            ("127.0.0.1:8470", f"127.0.0.1:{p['http']}"),
            (GUIDE_CHECKPOINT, self.checkpoint),
        ]
        self.used: set[str] = set()
        self.steps = guide_steps()

    # -- the guide's text --------------------------------------------------------------------------------------
    def substitute(self, text: str) -> str:
        for old, new in self.substitutions:
            if old in text:
                self.used.add(old)
                text = text.replace(old, new)
        return text

    def unused_substitutions(self) -> list[str]:
        return [old for old, _ in self.substitutions if old not in self.used]

    def expected(self, line: str) -> str:
        """A line the guide shows as output, as this walk's substitutions and loopback binding change it."""
        return self.substitute(line).replace("0.0.0.0:", "127.0.0.1:")

    # -- running -------------------------------------------------------------------------------------------------
    def bash(self, command: str, *, timeout: float = 300, new_session_is_ray: bool = False) -> Ran:
        """Run one command in the walk's bash (its exports kept for the next one), in the walk's directory."""
        script = (f"source {shlex.quote(str(self.env_file))}\n{command}\nrc=$?\n"
                  f"export -p > {shlex.quote(str(self.env_file))}.new && mv {shlex.quote(str(self.env_file))}.new "
                  f"{shlex.quote(str(self.env_file))}\nexit $rc\n")
        t0 = time.monotonic()
        proc = subprocess.Popen(["bash", "-c", script], cwd=self.work, env=self.base_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        if new_session_is_ray:
            self.ray_session = proc.pid  # ray start's daemons stay in this session: stop() ends exactly them
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err += f"\n(timed out after {timeout}s)"
        ran = Ran(command, proc.returncode, out, err, time.monotonic() - t0)
        self.ran.append(ran)
        return ran

    def step(self, name: str, *, timeout: float = 300) -> list[Ran]:
        """Run a marked block of the guide: bash one command at a time (each must succeed), YAML written to its
        file name (the block's first comment), Python run as a script."""
        lang, body = self.steps[name]
        body = self.substitute(body)
        if lang == "yaml":
            target = self.work / body.splitlines()[0].lstrip("# ").strip()
            target.write_text(body)
            return []
        if lang == "python":
            script = self.work / f"{name}.py"
            script.write_text(body)
            ran = self.bash(f"python {shlex.quote(str(script))}", timeout=timeout)
            if ran.returncode:
                raise AssertionError(f"guide step {name} failed:\n{ran.output}")
            return [ran]
        out = []
        for cmd in commands(body):
            ran = self.bash(cmd, timeout=timeout, new_session_is_ray=cmd.lstrip().startswith("ray start --head"))
            out.append(ran)
            if ran.returncode:
                raise AssertionError(f"guide step {name}: `{cmd}` failed ({ran.returncode}):\n{ran.output[-4000:]}")
        return out

    def redis_url(self) -> str:
        return (self.home / ".moefleet-redis-url").read_text().strip()

    # -- stopping what the walk started --------------------------------------------------------------------------
    def stop(self, grace_s: float = 5.0) -> None:
        if self.ray_session is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in session_pids(self.ray_session):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + grace_s
                while session_pids(self.ray_session) and time.monotonic() < deadline:
                    time.sleep(0.1)
        pidfile = self.home / ".config" / "moefleet" / "redis" / "redis.pid"
        if pidfile.is_file():
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass

    def __enter__(self) -> "GuideWalk":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
