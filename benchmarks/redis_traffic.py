"""Where a fleet's Redis traffic goes: a ``MONITOR`` sample grouped by command and key, with each group's bytes.

``INFO stats`` gives the server's totals (commands, bytes in and out); this
splits them. ``sample_monitor`` records every command Redis runs for a few
seconds (``MONITOR``: each line carries the command's arguments; commands run
inside Lua scripts come on lines of their own, marked ``lua``).
``breakdown`` groups the commands sent by clients by what they are -- the
command and its key's pattern (namespace dropped, numbers folded to ``<n>``),
or the script an ``EVALSHA`` runs, by name -- and gives each group's calls and
request bytes as Redis receives them (the RESP encoding of its arguments).
Reply bytes are not in ``MONITOR``: ``reply_sizes`` re-runs a few sampled calls
of each read-only group just after the sample and measures their RESP replies,
so a group's bytes out are its calls times their mean size (a key that changed
or expired since answers differently: an estimate); writes and scripts answer
a few bytes each, counted as such.

The monitor's own stream is output Redis sends too: sample outside the window
the ``INFO stats`` rates are taken over.
"""

from __future__ import annotations

import hashlib
import re
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

READ_ONLY = frozenset({
    "GET", "MGET", "HGET", "HMGET", "HGETALL", "HKEYS", "HVALS", "HLEN", "HEXISTS", "ZMSCORE", "ZSCORE", "ZRANGE",
    "ZRANGEBYSCORE", "ZREVRANGE", "ZREVRANGEBYSCORE", "ZCARD", "ZCOUNT", "XRANGE", "XREVRANGE", "XLEN", "LRANGE",
    "LLEN", "LINDEX", "EXISTS", "TIME", "PING", "STRLEN", "TTL", "PTTL", "TYPE", "SMEMBERS", "SCARD",
})
"""Commands ``reply_sizes`` may re-run to measure a reply (they change nothing)."""

SAMPLES_PER_GROUP = 8
"""Distinct calls of a group ``reply_sizes`` re-runs (their mean reply counts for the group)."""

SMALL_REPLY_BYTES = 5
"""What a write or a script is counted as answering (``+OK\\r\\n``, ``:1\\r\\n``): its reply is not re-run."""

NO_KEY = frozenset({"TIME", "PING", "MULTI", "EXEC", "DISCARD", "INFO", "CLIENT", "SCRIPT", "HELLO", "SELECT", "ECHO",
                    "COMMAND", "READONLY", "RESET", "QUIT"})

_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7, ord('"'): 34, ord("\\"): 92}
_NUMBERS = re.compile(r"(?<![A-Za-z])\d+(\.\d+)?(?![A-Za-z])")


@dataclass(frozen=True)
class MonitorLine:
    """One command as ``MONITOR`` printed it."""

    at: float
    client: str  # "127.0.0.1:53422", "lua" for a command a script ran, "unix:..." for a socket
    args: tuple[bytes, ...]


def parse_monitor_line(line: bytes) -> MonitorLine | None:
    """``+1700000000.123456 [0 127.0.0.1:5000] "SET" "k" "v"`` -> a ``MonitorLine`` (None for anything else).

    Arguments are quoted the way Redis prints them (``sdscatrepr``): ``\\"``, ``\\\\``, ``\\n``, ``\\r``,
    ``\\t``, ``\\a``, ``\\b`` and ``\\xHH`` are escapes; the argument's bytes are what the client sent."""
    line = line.rstrip(b"\r\n")
    if not line.startswith(b"+") or b" [" not in line:
        return None
    head, _, rest = line[1:].partition(b" [")
    source, _, rest = rest.partition(b"] ")
    try:
        at = float(head)
    except ValueError:
        return None
    parts = source.split(b" ", 1)
    client = parts[1].decode() if len(parts) == 2 else ""
    args: list[bytes] = []
    i, n = 0, len(rest)
    while i < n:
        if rest[i] != 0x22:  # '"'
            i += 1
            continue
        i += 1
        buf = bytearray()
        while i < n and rest[i] != 0x22:
            c = rest[i]
            if c == 0x5C and i + 1 < n:  # backslash
                e = rest[i + 1]
                if e == ord("x") and i + 3 < n:
                    buf.append(int(rest[i + 2:i + 4], 16))
                    i += 4
                    continue
                buf.append(_ESCAPES.get(e, e))
                i += 2
                continue
            buf.append(c)
            i += 1
        args.append(bytes(buf))
        i += 1
    if not args:
        return None
    return MonitorLine(at=at, client=client, args=tuple(args))


def request_bytes(args: Iterable[bytes]) -> int:
    """Bytes of a command as a client sends it (a RESP array of bulk strings)."""
    args = list(args)
    size = len(f"*{len(args)}\r\n")
    for a in args:
        size += len(f"${len(a)}\r\n") + len(a) + 2
    return size


def reply_bytes(reply: Any) -> int:
    """Bytes of a RESP2 reply as the server sends it, from its parsed value (bulk strings, integers, arrays, nil)."""
    if reply is None:
        return 5  # $-1\r\n
    if isinstance(reply, bool):
        return 4
    if isinstance(reply, int):
        return len(f":{reply}\r\n")
    if isinstance(reply, float):  # a score a client library parsed (it came as a bulk string)
        reply = repr(reply)
    if isinstance(reply, str):
        reply = reply.encode()
    if isinstance(reply, (bytes, bytearray)):
        return len(f"${len(reply)}\r\n") + len(reply) + 2
    if isinstance(reply, dict):
        reply = [x for kv in reply.items() for x in kv]
    if isinstance(reply, (list, tuple)):
        return len(f"*{len(reply)}\r\n") + sum(reply_bytes(x) for x in reply)
    raise TypeError(f"reply of type {type(reply).__name__}")


def key_pattern(key: str, namespace: str | None = None) -> str:
    """A key's pattern: the namespace dropped (``ns:``), numbers folded to ``<n>`` (``load:1.0:<n>:sources``)."""
    if namespace and key.startswith(namespace + ":"):
        key = key[len(namespace) + 1:]
    return _NUMBERS.sub("<n>", key)


def script_names(scripts: Mapping[str, str]) -> dict[str, str]:
    """``{name: Lua source}`` -> ``{sha1: name}``: how ``EVALSHA`` names the script it runs."""
    return {hashlib.sha1(src.encode()).hexdigest(): name for name, src in scripts.items()}


def group_of(args: tuple[bytes, ...], scripts: Mapping[str, str], namespace: str | None = None) -> str:
    """The group a command counts in: ``EVALSHA <script name>``, ``<CMD> <key pattern>`` or ``<CMD>``."""
    cmd = args[0].decode(errors="replace").upper()
    if cmd in ("EVALSHA", "EVALSHA_RO") and len(args) > 1:
        sha = args[1].decode(errors="replace").lower()
        return f"{cmd} {scripts.get(sha, sha[:12])}"
    if cmd in NO_KEY or len(args) < 2:
        return cmd
    return f"{cmd} {key_pattern(args[1].decode(errors='replace'), namespace)}"


def breakdown(lines: Iterable[MonitorLine], seconds: float, scripts: Mapping[str, str] | None = None,
              namespace: str | None = None, replies: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Group a monitor sample ``seconds`` long: ``{"groups": {group: {...}}, "lua_calls_per_s", ...}``, largest first.

    Each group: ``calls_per_s``, ``in_bytes_per_s`` (requests as sent), ``out_bytes_per_s`` (calls times
    ``replies[group]``, or ``SMALL_REPLY_BYTES`` for a group not measured), ``clients`` (connections it came
    from). Commands run inside scripts are counted apart (``lua_calls_per_s``, by command): they cross no
    network, though ``INFO stats`` counts them among the commands processed."""
    if seconds <= 0:
        raise ValueError("seconds must be positive")
    scripts = scripts or {}
    replies = replies or {}
    groups: dict[str, dict[str, Any]] = {}
    lua: dict[str, int] = {}
    samples: dict[str, list[tuple[bytes, ...]]] = {}
    for line in lines:
        if line.client == "lua":
            cmd = line.args[0].decode(errors="replace").upper()
            lua[cmd] = lua.get(cmd, 0) + 1
            continue
        g = group_of(line.args, scripts, namespace)
        entry = groups.setdefault(g, {"calls": 0, "in_bytes": 0, "clients": set()})
        entry["calls"] += 1
        entry["in_bytes"] += request_bytes(line.args)
        entry["clients"].add(line.client)
        kept = samples.setdefault(g, [])
        if line.args not in kept:  # distinct calls of the group, the latest kept
            kept.append(line.args)
            del kept[:-SAMPLES_PER_GROUP]
    out = {}
    for g, e in groups.items():
        reply = replies.get(g, SMALL_REPLY_BYTES)
        out[g] = {"calls_per_s": e["calls"] / seconds, "in_bytes_per_s": e["in_bytes"] / seconds,
                  "out_bytes_per_s": e["calls"] * reply / seconds, "reply_bytes": reply, "clients": len(e["clients"])}
    ordered = dict(sorted(out.items(), key=lambda kv: -(kv[1]["in_bytes_per_s"] + kv[1]["out_bytes_per_s"])))
    return {
        "seconds": seconds,
        "groups": ordered,
        "calls_per_s": sum(g["calls_per_s"] for g in out.values()),
        "in_bytes_per_s": sum(g["in_bytes_per_s"] for g in out.values()),
        "out_bytes_per_s": sum(g["out_bytes_per_s"] for g in out.values()),
        "lua_calls_per_s": {c: n / seconds for c, n in sorted(lua.items(), key=lambda kv: -kv[1])},
        "_samples": samples,
    }


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=5)
    if parts.password:
        user = parts.username or "default"
        sock.sendall(request_frame([b"AUTH", user.encode(), parts.password.encode()]))
        if not sock.recv(64).startswith(b"+OK"):
            raise RuntimeError("MONITOR: AUTH refused")
    return sock


def request_frame(args: list[bytes]) -> bytes:
    return b"".join([f"*{len(args)}\r\n".encode(), *(f"${len(a)}\r\n".encode() + a + b"\r\n" for a in args)])


def sample_monitor(url: str, seconds: float) -> tuple[list[MonitorLine], float]:
    """Every command Redis at ``url`` runs for ``seconds`` (``MONITOR``); returns the lines and the span measured."""
    sock = _connect(url)
    try:
        sock.sendall(b"MONITOR\r\n")
        buf = b""
        while b"\r\n" not in buf:
            buf += sock.recv(4096)
        first, _, buf = buf.partition(b"\r\n")
        if not first.startswith(b"+OK"):
            raise RuntimeError(f"MONITOR refused: {first!r}")
        lines: list[MonitorLine] = []
        t0 = time.perf_counter()
        sock.settimeout(0.2)
        while time.perf_counter() - t0 < seconds:
            try:
                chunk = sock.recv(1 << 20)
            except socket.timeout:
                continue
            if not chunk:
                break
            buf += chunk
            *complete, buf = buf.split(b"\r\n")
            for raw in complete:
                parsed = parse_monitor_line(raw)
                if parsed is not None:
                    lines.append(parsed)
        return lines, time.perf_counter() - t0
    finally:
        sock.close()


def reply_sizes(url: str, samples: Mapping[str, list[tuple[bytes, ...]]]) -> dict[str, int]:
    """Re-run the sampled calls of each read-only group against ``url`` (up to ``SAMPLES_PER_GROUP`` distinct ones)
    and measure their replies (RESP2 bytes): the mean for each group."""
    import redis

    r = redis.Redis.from_url(url)
    out = {}
    try:
        for group, calls in samples.items():
            cmd = calls[0][0].decode(errors="replace").upper()
            if cmd not in READ_ONLY:
                continue
            sizes = []
            for args in calls:
                conn = r.connection_pool.get_connection(cmd)
                try:
                    conn.send_command(*args)
                    reply = conn.read_response()
                    try:
                        sizes.append(reply_bytes(reply))
                    except TypeError:  # a reply shape not measured: the group keeps the small default
                        pass
                finally:
                    r.connection_pool.release(conn)
            if sizes:
                out[group] = round(sum(sizes) / len(sizes))
    finally:
        r.close()
    return out


def measure(url: str, seconds: float, namespace: str | None = None, scripts: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``sample_monitor`` then ``breakdown`` with measured reply sizes (what the benchmark stores)."""
    lines, span = sample_monitor(url, seconds)
    first = breakdown(lines, span, script_names(scripts or {}), namespace)
    result = breakdown(lines, span, script_names(scripts or {}), namespace, reply_sizes(url, first["_samples"]))
    result.pop("_samples")
    return result
