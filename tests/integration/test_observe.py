"""Seeing the experts on a live local fleet: /metrics under load, the collapse warning, the dashboard
in headless Chromium, and a routing trace recorded from the fleet and replayed through the planner."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections import Counter

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from moefleet.controller.traces import record_windows, replay
from moefleet.core.config import FleetConfig, RouterConfig, WorkerConfig
from moefleet.core.placement import DeviceSpec, Inventory
from moefleet.core.trace import Trace, read_trace, write_trace
from moefleet.local import LocalFleet
from moefleet.router_service.client import FleetClient, FleetError
from tests import hf_models
from tests.chromium import chromium

pytestmark = [pytest.mark.integration, pytest.mark.slow]

E, H = 8, 32  # a tiny Mixtral: MoE layers 0, 1, 2 of 8 experts, top-2, hidden size 32


@pytest.fixture(scope="module")
def fleet(ray_cluster, redis_server, tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral-obs")
    model, _ = hf_models.build("mixtral", num_local_experts=E, num_experts_per_tok=2, num_hidden_layers=3, hidden_size=H)
    model.save_pretrained(path)
    cfg = FleetConfig(
        checkpoint=str(path), num_workers=3, redis_url=redis_server.url, namespace=f"obs-{uuid.uuid4().hex[:8]}",
        worker=WorkerConfig(num_cpus=0.5), router=RouterConfig(telemetry_interval_s=0.2, load_window_s=1.0), http_port=0,
    )
    f = LocalFleet(cfg)  # the controller runs, with local mode's defaults
    f.start()
    f.client = FleetClient(f.address)
    f.client.wait_ready(60)
    f.url = f"http://{f.http_address}"
    yield f
    f.client.close()
    f.stop()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return r.read()


def _state(fleet) -> dict:
    return json.loads(_get(fleet.url + "/api/state"))


def _metrics(fleet) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(_get(fleet.url + "/metrics").decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _logits(tokens: int, favoured: list[int], generator: torch.Generator | None = None) -> torch.Tensor:
    """Router logits [T, E]: the ``favoured`` experts far above the rest (the same order for every token),
    or, with a generator and nothing favoured, random (routing spread over every expert)."""
    if generator is not None:
        return torch.randn(tokens, E, generator=generator) * 3
    row = torch.linspace(-8.0, -4.0, E)
    row[favoured] = 10.0
    return row.expand(tokens, E).contiguous()


def _send(fleet, layer: int, logits: torch.Tensor, counts: Counter | None = None) -> None:
    hidden = torch.randn(logits.shape[0], H)
    _, ids, _ = fleet.client.forward(layer, hidden, router_logits=logits, return_routing=True)
    if counts is not None:
        counts.update(int(e) for e in ids.reshape(-1))


def _until(what: str, check, timeout: float = 20.0, every: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def test_metrics_move_as_the_load_says(fleet):
    before = _metrics(fleet)
    sent: Counter = Counter()
    for _ in range(12):
        _send(fleet, 0, _logits(32, [5]), sent)
    with pytest.raises(FleetError):
        fleet.client.forward(7, torch.randn(4, H))  # not a MoE layer: counted as NOT_FOUND
    assert sum(sent.values()) == 12 * 32 * 2  # top-2

    def key(name, **labels):
        return (name, tuple(sorted((k, str(v)) for k, v in labels.items())))

    def moved():
        after = _metrics(fleet)
        delta = {e: after.get(key("moefleet_expert_tokens_total", layer=0, expert=e), 0)
                 - before.get(key("moefleet_expert_tokens_total", layer=0, expert=e), 0) for e in range(E)}
        return (after, delta) if delta == {e: sent.get(e, 0) for e in range(E)} else None

    after, _ = _until("per-expert counters move by what was routed", moved)
    ok = key("moefleet_requests_total", code="OK")
    assert after[ok] - before.get(ok, 0) >= 12
    nf = key("moefleet_requests_total", code="NOT_FOUND")
    assert after[nf] - before.get(nf, 0) == 1
    lat = key("moefleet_layer_latency_seconds_count", layer=0)
    assert after[lat] - before.get(lat, 0) == 12
    served = sum(v for (name, _), v in after.items() if name == "moefleet_device_tokens_total")
    served_before = sum(v for (name, _), v in before.items() if name == "moefleet_device_tokens_total")
    assert served - served_before == sum(sent.values())  # every routed row was computed by some device
    # balancedness and entropy come from the recent load windows: present once a window with this load closed
    now = _until("layer 0 balancedness and entropy measured", lambda: (
        lambda m: m if m.get(key("moefleet_layer_balancedness", layer=0)) and key("moefleet_routing_entropy", layer=0) in m
        else None)(_metrics(fleet)))
    assert 0 < now[key("moefleet_layer_balancedness", layer=0)] <= 1
    assert 0 <= now[key("moefleet_routing_entropy", layer=0)] <= 1
    for name in ("moefleet_expert_replicas", "moefleet_device_memory_bytes", "moefleet_rebalances_total",
                 "moefleet_rebalance_seconds_count", "moefleet_weight_bytes_moved_total", "moefleet_routing_entropy"):
        assert any(n == name for n, _ in now), name


def test_collapse_warning_fires_on_one_expert_and_not_on_uniform_routing(fleet):
    stop = threading.Event()
    g = torch.Generator().manual_seed(1)

    def traffic():
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:  # bounded; stopped once the snapshot shows both layers
            _send(fleet, 1, _logits(32, [5]))  # every token routed to expert 5 (and the same second one)
            _send(fleet, 2, _logits(32, [], g))  # spread over every expert

    t = threading.Thread(target=traffic)
    t.start()
    try:
        def both_judged():
            s = _state(fleet)
            stats = {x["layer"]: x for x in s["layer_stats"]}
            return s if stats[1]["collapsed"] and stats[2]["tokens"] >= 500 and stats[1]["tokens"] >= 500 else None

        state = _until("layer 1 collapsed while layer 2 carries uniform traffic", both_judged, timeout=30)
    finally:
        stop.set()
        t.join(60)
    stats = {x["layer"]: x for x in state["layer_stats"]}
    assert stats[1]["entropy"] < 0.55 <= stats[2]["entropy"] and not stats[2]["collapsed"]
    assert 5 in [h["expert"] for h in stats[1]["hot"][:2]]
    warnings = [w for w in state["warnings"] if w.startswith(("layer 1:", "layer 2:"))]  # layer 0: the test before's traffic
    assert len(warnings) == 1 and warnings[0].startswith("layer 1: routing collapsed onto experts [") and "5" in warnings[0]
    m = _metrics(fleet)
    assert m[("moefleet_routing_collapsed", (("layer", "1"),))] == 1
    assert m[("moefleet_routing_collapsed", (("layer", "2"),))] == 0


def test_dashboard_in_chromium_shows_the_hot_experts_and_their_new_replicas(fleet, tmp_path):
    from html.parser import HTMLParser

    hot = [0, 1]  # layer 0's experts 0 and 1 take every token (top-2): each half the layer's load, over 3 devices
    store_placement = fleet.store.get_placement
    v0 = store_placement().version
    before = {e: len(store_placement().replicas()[(0, e)]) for e in hot}
    stop = threading.Event()
    sent: Counter = Counter()

    errors: list = []

    def traffic():
        deadline = time.monotonic() + 150
        while not stop.is_set() and time.monotonic() < deadline:  # bounded; runs until the page has been read
            try:
                _send(fleet, 0, _logits(32, hot), sent)
            except Exception as e:  # surfaced below
                errors.append(e)
                return

    t = threading.Thread(target=traffic)
    t.start()
    try:
        routed_hot = _until("traffic routed", lambda: [e for e, _ in sent.most_common(2)] if sum(sent.values()) > 1000 else None)
        assert sorted(routed_hot) == hot

        def replicated():
            p = store_placement()
            reps = p.replicas()
            return p if p.version > v0 and sum(len(reps[(0, e)]) for e in hot) > sum(before.values()) else None

        placement = _until("the controller gives a hot expert another replica", replicated, timeout=45)
        def sampled():  # the snapshot holds the new placement, and the routed load of the last seconds is this traffic's
            s = _state(fleet)
            top = sorted(h["expert"] for h in s["layer_stats"][0]["hot"][:2])
            return s["placement"]["version"] >= placement.version and top == hot

        _until("the endpoint has sampled the new placement and load", sampled)
        dom = chromium("--virtual-time-budget=5000", "--dump-dom", fleet.url + "/", profile=tmp_path / "profile")
        chromium("--virtual-time-budget=5000", "--window-size=1400,1500", "--hide-scrollbars",
                  f"--screenshot={tmp_path / 'dashboard.png'}", fleet.url + "/", profile=tmp_path / "profile")
        final = store_placement()
    finally:
        stop.set()
        t.join(60)

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.body, self.chips, self.cards, self.canvases, self.routers = {}, [], [], 0, 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "body":
                self.body = a
            if "hot-expert" in (a.get("class") or ""):
                self.chips.append({k[5:]: v for k, v in a.items() if k.startswith("data-")})
            if "device" in (a.get("class") or "").split() and "data-device" in a:
                self.cards.append(a["data-device"])
            self.canvases += tag == "canvas"
            self.routers += tag == "tr" and a.get("class") == "router"

    assert not errors, errors[:3]  # no request failed while the controller rebalanced
    page = Page()
    page.feed(dom)
    assert page.body.get("data-ready") == "1", "the page rendered the fleet's state"
    assert int(page.body["data-version"]) >= placement.version > v0
    layer0 = [c for c in page.chips if c["layer"] == "0"]
    assert sorted(int(c["expert"]) for c in layer0[:2]) == hot, layer0  # shown as the hottest experts of layer 0
    rendered = next(p for p in [final, *fleet.store.placement_history(16)] if p.version == int(page.body["data-version"]))
    shown = {int(c["expert"]): int(c["replicas"]) for c in layer0[:2]}
    assert shown == {e: len(rendered.replicas()[(0, e)]) for e in hot}  # the replicas of the placement it rendered
    assert sum(shown.values()) > sum(before.values()) and max(shown.values()) >= 2, (shown, before)  # new replicas shown
    assert sorted(page.cards) == ["worker-0", "worker-1", "worker-2"] and page.canvases >= 5  # heatmaps, a map per device
    assert page.routers >= 1  # the routers table: how calls reach the workers, bytes moved, overhead
    png = (tmp_path / "dashboard.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_a_recorded_trace_replays_the_loads_the_fleet_routed(fleet, tmp_path):
    store = fleet.store
    time.sleep(2.0)  # what earlier tests sent has reached the store: the recorded windows hold only this test's traffic
    sent: Counter = Counter()
    windows: list = []
    recorder = threading.Thread(
        target=lambda: windows.extend(record_windows(store, 6.0, [0, 1, 2], E, window_s=1.0, settle_s=1.0))
    )
    start = store.time()
    recorder.start()
    first_window = int(start) + 1
    while store.time() < first_window + 0.1:  # traffic only inside the recorded windows
        time.sleep(0.02)
    while store.time() < first_window + 3.5:
        _send(fleet, 0, _logits(16, [3, 4]), sent)
    recorder.join(30)
    assert not recorder.is_alive()
    lines = [line for window in windows for line in window]
    assert len(windows) == 5 and len(lines) == 15  # a line per (window, layer)
    path = write_trace(tmp_path / "trace.jsonl", lines)
    trace = read_trace(path)
    recorded = {e: int(n) for e, n in enumerate(trace.load()[0]) if n}
    assert recorded == dict(sent) and trace.load()[1:].sum() == 0
    inventory = Inventory(devices=[DeviceSpec(device_id=f"d{i}", node_id="n", kind="gpu", memory_bytes=1 << 30) for i in range(2)])
    steps = replay(trace, inventory, expert_bytes=1 << 20, window_s=1.0)
    assert len(steps) == 5
    for k, step in enumerate(steps):  # each replayed window fed the planner exactly the recorded counts
        assert step.load == Trace.from_lines(windows[k]).load().astype(int).tolist()
    assert sum(step.load[0][e] for step in steps for e in range(E)) == sum(sent.values())
    assert any(s.decision != "skipped: too little load to plan from" for s in steps)
