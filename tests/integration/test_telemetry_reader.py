"""The telemetry endpoint's incremental reader against a real redis-server: what did not change is not read again,
and what a one-shot ``read_inputs`` gives is what it gives.

No Ray. Redis's own command counts (``INFO commandstats``) tell which reads were made.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from moefleet.controller.telemetry import InputsReader, TelemetryConfig, read_inputs
from moefleet.core.placement import Placement

pytestmark = pytest.mark.integration


def _calls(store) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in store._client.info("commandstats").items()}


def _publish(store, devices: int, layers: int = 2) -> Placement:
    p = Placement(assignments={f"d{i}": [(l, i) for l in range(layers)] for i in range(devices)})
    return store.publish_placement(p, expected_version=store.placement_version())


def _same_as_one_shot(got, want) -> None:
    assert got.placement == want.placement
    assert got.windows == want.windows
    assert got.heartbeats == want.heartbeats
    assert got.events == want.events
    assert (got.controller, got.rebalance, got.counters, got.leader) == (want.controller, want.rebalance, want.counters,
                                                                        want.leader)


def test_the_reader_reads_the_placement_again_only_when_it_moved(store):
    _publish(store, 2)
    reader = InputsReader(store, TelemetryConfig())
    first = reader.read()
    again = reader.read()
    assert again.placement is first.placement  # kept, not read and parsed again
    moved = _publish(store, 3)
    third = reader.read()
    assert third.placement == store.get_placement() and third.placement.version == moved.version
    _same_as_one_shot(third, read_inputs(store, TelemetryConfig()))


def test_the_reader_reads_only_new_events_and_the_whole_stream_again_after_a_reset(store):
    cfg = TelemetryConfig(events=5)
    reader = InputsReader(store, cfg)
    for i in range(3):
        store.emit_event("tick", {"i": i})
    assert [e["data"]["i"] for e in reader.read().events] == [0, 1, 2]
    for i in range(3, 9):
        store.emit_event("tick", {"i": i})
    new, follows = store.events_after(reader._events[-1].id, 100)
    assert follows and [e.data["i"] for e in new] == [3, 4, 5, 6, 7, 8]  # only what came after the newest held
    got = reader.read()
    assert [e["data"]["i"] for e in got.events] == [4, 5, 6, 7, 8]  # the newest ``events``, as a one-shot read
    _same_as_one_shot(got, read_inputs(store, cfg))
    # the store was reset: the stream starts again with ids older than the reader's newest
    store._client.delete(store.keys.events)
    store._client.xadd(store.keys.events, {"event": json.dumps({"kind": "tick", "at": 0.0, "data": {"i": 100}})}, id="1-1")
    assert store.events_after(reader._events[-1].id, 100) == ([], False)
    assert [e["data"]["i"] for e in reader.read().events] == [100]


def test_the_reader_reads_a_complete_window_once_and_its_snapshot_matches_a_one_shot_read(store):
    cfg = TelemetryConfig()
    now = store.time()
    for back in range(4):  # windows behind the current one, and the current one
        store.record_load({(0, back): 10 + back}, now=now - back * cfg.window_s)
    reader = InputsReader(store, cfg)
    first = reader.read()
    before = _calls(store)
    second = reader.read()
    read_again = _calls(store).get("hgetall", 0) - before.get("hgetall", 0)
    # complete windows two or more behind are kept: only the current and the previous are read again
    # (plus the worker registry and the counters, one HGETALL each)
    assert read_again <= 2 + 2, read_again
    _same_as_one_shot(second, read_inputs(store, cfg))
    assert first.totals == {} and second.totals == {}  # the per-expert totals only when asked
    assert reader.read(totals=True).totals == store.load_totals()


def test_the_endpoint_reads_the_per_expert_totals_only_when_metrics_are_scraped(store, monkeypatch):
    from moefleet.controller.http import TelemetryServer

    _publish(store, 2)
    store.record_load({(0, 1): 7, (1, 0): 3}, now=None)
    reads = []
    real = store.load_totals
    monkeypatch.setattr(store, "load_totals", lambda: reads.append(1) or real())
    server = TelemetryServer(store, TelemetryConfig(sample_interval_s=60.0), host="127.0.0.1", port=0)
    server.start()  # its first snapshot
    try:
        for _ in range(3):
            assert server.sample() is not None
        assert reads == []  # snapshots do not read the L x E totals hash
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'moefleet_expert_tokens_total{expert="1",layer="0"} 7.0' in text
        assert 'moefleet_expert_tokens_total{expert="0",layer="1"} 3.0' in text
        assert len(reads) == 1
        store.record_load({(0, 1): 5}, now=None)
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=10) as r:
            assert 'moefleet_expert_tokens_total{expert="1",layer="0"} 7.0' in r.read().decode()  # read once per interval
        assert len(reads) == 1
        server._totals = (server._totals[0] - 61.0, server._totals[1])  # older than sample_interval_s: read again
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=10) as r:
            assert 'moefleet_expert_tokens_total{expert="1",layer="0"} 12.0' in r.read().decode()
    finally:
        server.stop()
