"""The Redis traffic breakdown of the benchmarks (benchmarks/redis_traffic.py): MONITOR lines parsed, commands
grouped by key pattern or script, request and reply bytes as RESP counts them. Pure: no Redis."""

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import redis_traffic as rt  # noqa: E402


def test_a_monitor_line_gives_its_client_and_the_bytes_of_each_argument():
    line = rb'+1700000000.250000 [0 127.0.0.1:53422] "HSET" "ns:workers" "w\"1\\" "a\x00\n\xff"' + b"\r\n"
    got = rt.parse_monitor_line(line)
    assert got.at == 1700000000.25 and got.client == "127.0.0.1:53422"
    assert got.args == (b"HSET", b"ns:workers", b'w"1\\', b"a\x00\n\xff")
    lua = rt.parse_monitor_line(b'+1700000000.3 [0 lua] "ZADD" "ns:workers:expiry" "5" "w1"')
    assert lua.client == "lua" and lua.args[0] == b"ZADD"
    assert rt.parse_monitor_line(b"+OK") is None


def test_request_and_reply_bytes_are_their_resp_encodings():
    # *3\r\n $3\r\nSET\r\n $1\r\nk\r\n $2\r\nvv\r\n
    assert rt.request_bytes([b"SET", b"k", b"vv"]) == len(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nvv\r\n")
    assert rt.reply_bytes(b"abc") == len(b"$3\r\nabc\r\n")
    assert rt.reply_bytes(None) == len(b"$-1\r\n")
    assert rt.reply_bytes(12) == len(b":12\r\n")
    assert rt.reply_bytes([b"a", 1]) == len(b"*2\r\n$1\r\na\r\n:1\r\n")
    assert rt.reply_bytes({"f": "v"}) == len(b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n")  # a hash a client library made a dict


def test_keys_group_by_pattern_and_scripts_by_name():
    scripts = {"register_worker": "return 1"}
    names = rt.script_names(scripts)
    sha = hashlib.sha1(b"return 1").hexdigest()
    assert names == {sha: "register_worker"}
    assert rt.group_of((b"EVALSHA", sha.encode(), b"2", b"ns:workers"), names, "ns") == "EVALSHA register_worker"
    assert rt.group_of((b"hincrby", b"ns:load:1.0:1700000", b"3:4", b"1"), names, "ns") == "HINCRBY load:<n>:<n>"
    assert rt.group_of((b"GET", b"ns:record:controller"), names, "ns") == "GET record:controller"
    assert rt.group_of((b"TIME",), names, "ns") == "TIME"
    assert rt.key_pattern("other:load:total", "ns") == "other:load:total"


def test_breakdown_counts_calls_and_bytes_per_second_and_keeps_script_commands_apart():
    lines = [
        rt.MonitorLine(0.0, "127.0.0.1:1", (b"GET", b"ns:placement")),
        rt.MonitorLine(0.1, "127.0.0.1:2", (b"GET", b"ns:placement")),
        rt.MonitorLine(0.2, "127.0.0.1:1", (b"SET", b"ns:record:x", b"v" * 100)),
        rt.MonitorLine(0.2, "lua", (b"ZADD", b"ns:workers:expiry", b"1", b"w")),
    ]
    got = rt.breakdown(lines, 2.0, {}, "ns", replies={"GET placement": 1000})
    get, put = got["groups"]["GET placement"], got["groups"]["SET record:x"]
    assert get["calls_per_s"] == 1.0 and get["clients"] == 2
    assert get["in_bytes_per_s"] == 2 * rt.request_bytes([b"GET", b"ns:placement"]) / 2.0
    assert get["out_bytes_per_s"] == 1000.0  # 2 calls x 1000 bytes over 2 s
    assert put["out_bytes_per_s"] == rt.SMALL_REPLY_BYTES / 2.0  # a write is not re-run: counted as a short reply
    assert list(got["groups"]) == ["GET placement", "SET record:x"]  # largest first
    assert got["lua_calls_per_s"] == {"ZADD": 0.5}
    assert got["calls_per_s"] == 1.5
    with pytest.raises(ValueError):
        rt.breakdown(lines, 0.0)
