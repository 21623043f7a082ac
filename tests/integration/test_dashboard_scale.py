"""The dashboard at DeepSeek-V3 scale: 58 MoE layers x 256 experts on 32 GPUs (16,704 replicas), in headless Chromium.

The fleet's store (a real redis-server) is filled through the real ``StateStore``
API as the fleet's parts fill it: the routers' load windows and heartbeats, the
workers' heartbeats, a placement planned by the real EPLB from that load (288
slots per layer: 9 per GPU), its publish and the controller's reports. A real
``TelemetryServer`` serves the page from it; Chromium renders it.
"""

from __future__ import annotations

import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from moefleet.controller.eplb import rebalance_experts
from moefleet.controller.http import TelemetryServer
from moefleet.controller.telemetry import TelemetryConfig, rebalance_increments
from moefleet.core.placement import Placement, spread_placement
from moefleet.core.request_stats import observe_request
from tests.chromium import chromium

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LAYERS = list(range(3, 61))  # DeepSeek-V3: layers 0-2 dense, 3-60 MoE
E, TOP_K, GPUS, NODES, GROUPS, SLOTS = 256, 8, 32, 4, 8, 288  # 288 slots per layer: 256 experts + 32 redundant
HOT_LAYER, HOT_EXPERT, HOT_SHARE = 33, 137, 0.10  # one expert takes 10% of its layer's routed assignments
DOWN = "node-3/gpu7"  # in the placement, no heartbeat
WINDOW_S, WINDOWS, TOKENS = 60.0, 5, 4096  # routers' load windows: 60 s each, the last 5 summed; 4096 tokens/layer/window
EXPERT_BYTES = 3 * 7168 * 2048  # one fp8 expert (gate, up, down) of DeepSeek-V3
SCREENSHOT_COPY = Path(__file__).resolve().parents[2] / ".cache-moefleet" / "dashboard-58x256.png"


def _devices() -> list[str]:
    return [f"node-{g // 8}/gpu{g % 8}" for g in range(GPUS)]


def _routed_share(rng: np.random.Generator) -> np.ndarray:
    """[L, E] share of each layer's assignments per expert: skewed (Dirichlet), the hot expert fixed at HOT_SHARE."""
    p = rng.dirichlet(np.full(E, 0.6), size=len(LAYERS))
    i = LAYERS.index(HOT_LAYER)
    p[i, HOT_EXPERT] = 0
    p[i] *= (1 - HOT_SHARE) / p[i].sum()
    p[i, HOT_EXPERT] = HOT_SHARE
    return p


def _fill(store) -> dict:
    """The store of a 58 x 256 fleet on 32 GPUs under traffic; returns what was put in it."""
    rng = np.random.default_rng(7)
    share = _routed_share(rng)
    now = store.time()
    current = int(now // WINDOW_S)
    load = np.zeros((len(LAYERS), E), dtype=np.int64)
    for k in range(WINDOWS, 0, -1):  # the complete windows before the current one, as the routers flush them
        counts = np.stack([rng.multinomial(TOKENS * TOP_K, p) for p in share])
        load += counts
        store.record_load({(layer, e): int(counts[i, e]) for i, layer in enumerate(LAYERS) for e in range(E)},
                          now=(current - k) * WINDOW_S + 1.0, window_s=WINDOW_S, source=f"router-{k % 2}")

    devices = _devices()
    store.publish_placement(spread_placement(LAYERS, E, devices), expected_version=0)
    phy2log, _, _ = rebalance_experts(load.astype(np.float64), SLOTS, GROUPS, NODES, GPUS)
    per_gpu = SLOTS // GPUS
    held: dict[str, set] = {d: set() for d in devices}
    for i, layer in enumerate(LAYERS):
        for slot, e in enumerate(phy2log[i].tolist()):
            held[devices[slot // per_gpu]].add((layer, int(e)))
    placement = store.publish_placement(Placement(assignments={d: sorted(k) for d, k in held.items()}), expected_version=1)
    replicas = {k: len(v) for k, v in placement.replicas().items()}
    loads = sum(len(v) for v in held.values()) - len(LAYERS) * E
    store.emit_event("plan", {"applied_version": placement.version, "balancedness_before": 0.41, "balancedness_after": 0.93,
                              "gain": 0.52, "apply_seconds": 38.5})
    store.emit_event("placement", {"version": placement.version, "loads": loads, "bytes": loads * EXPERT_BYTES,
                                   "reason": "gain 0.520"})
    store.add_counters("rebalance", rebalance_increments(38.5, loads, loads * EXPERT_BYTES))
    store.try_acquire_lease("controller-0", ttl_s=600)

    for d in devices:  # worker heartbeats: what each served over its last seconds, by the share of each replica
        if d == DOWN:
            continue
        served = {layer: 0 for layer in LAYERS}
        tokens = {}
        for layer, e in sorted(held[d]):
            n = int(load[LAYERS.index(layer), e] // replicas[(layer, e)])
            served[layer] += n
            tokens[f"{layer}:{e}"] = n
        store.register_worker(f"worker:{d}", {
            "worker_id": d, "queue_depth": int(rng.integers(0, 4)), "tokens_total": sum(tokens.values()),
            "memory_bytes": len(held[d]) * EXPERT_BYTES, "reserved_bytes": (len(held[d]) + 32) * EXPERT_BYTES,
            "device": "cuda:0", "backend": "triton", "accelerator": {"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 << 30},
            "recent_tokens": {"window_s": 5.0, "layers": {str(layer): n for layer, n in served.items()}},
        }, None, 600)
    for r in range(2):  # routers: the model they serve, their requests and latencies
        codes: dict = {}
        latency: dict = {}
        for layer in LAYERS:
            for s in rng.gamma(4.0, 0.004, size=50):
                observe_request(codes, latency, "OK", layer, float(s))
        observe_request(codes, latency, "RESOURCE_EXHAUSTED", None, 0.0)
        store.register_worker(f"router:router-{r}", {
            "kind": "ingress", "address": f"127.0.0.1:{50051 + r}", "placement_version": placement.version,
            "placement_generation": placement.generation,
            "stats": {"requests": sum(codes.values()), "tokens_computed": int(load.sum()) // TOP_K // 2,
                      "codes": codes, "layer_latency": latency},
            "model": {"family": "deepseek_v3", "moe_layers": LAYERS, "num_experts": E, "top_k": TOP_K},
        }, None, 600)
    return {"placement": placement, "held": held}


class _Page(HTMLParser):
    """What the dumped DOM holds: the body's attributes, the layers table's rows, hot-expert chips, device cards."""

    def __init__(self):
        super().__init__()
        self.body: dict = {}
        self.rows: list[str] = []
        self.chips: list[dict] = []
        self.cards: dict[str, str] = {}
        self.warnings = 0
        self.ids: dict[str, dict] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "body":
            self.body = a
        if "id" in a:
            self.ids[a["id"]] = a
        if tag == "tr" and "data-layer" in a:
            self.rows.append(a["data-layer"])
        if "hot-expert" in cls:
            self.chips.append({k[5:]: v for k, v in a.items() if k.startswith("data-")})
        if "device" in cls and "data-device" in a:
            self.cards[a["data-device"]] = a["class"]
        self.warnings += tag == "li" and "warning" in cls


@pytest.fixture
def server(store):
    facts = _fill(store)
    # one snapshot, taken at start and served throughout: the page and the test read the same numbers
    srv = TelemetryServer(store, TelemetryConfig(window_s=WINDOW_S, recent_windows=WINDOWS, sample_interval_s=3600), port=0)
    srv.start()
    srv.facts = facts
    yield srv
    srv.stop()


def test_dashboard_is_readable_at_58_layers_by_256_experts_on_32_devices(server, tmp_path):
    state = server.state()
    assert state["layers"] == LAYERS and state["num_experts"] == E and len(state["devices"]) == GPUS
    assert sum(len(es) for held in state["placement"]["assignments"].values() for es in held.values()) > 15_000  # replicas drawn
    row = LAYERS.index(HOT_LAYER)
    assert int(np.argmax(state["load"][row])) == HOT_EXPERT  # the snapshot's routed load carries the hot expert

    url = f"http://{server.address}/"
    profile = tmp_path / "profile"
    dom, console = chromium("--virtual-time-budget=10000", "--window-size=1600,1200", "--dump-dom", url,
                            profile=profile, console=True)
    png = tmp_path / "dashboard-58x256.png"
    chromium("--virtual-time-budget=10000", "--window-size=1600,1200", "--hide-scrollbars", f"--screenshot={png}", url,
             profile=profile)
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, SCREENSHOT_COPY)

    page = _Page()
    page.feed(dom)
    # bounded: the page fetched and drew the snapshot within Chromium's 10 s (virtual) time budget, Chromium within 90 s
    assert page.body.get("data-ready") == "1", "the page rendered the snapshot within Chromium's time budget"
    assert "data-error" not in page.body, page.body.get("data-error")
    assert not [line for line in console if "Uncaught" in line or "Error" in line], console
    layout = json.loads(page.body["data-layout"])
    print(f"\ndashboard 58x256: layout {layout}")

    # the heatmap: one row per layer, a column per expert, cells large enough to see, the page wide enough for it
    heat = layout["heat"]
    assert (heat["rows"], heat["cols"]) == (len(LAYERS), E)
    assert heat["cell_w"] >= 3 and heat["cell_h"] >= 3, heat  # each (layer, expert) at least 3 x 3 screen pixels
    assert layout["overflow_x"] == 0, "nothing wider than the window"

    # the known hot expert is drawn hot, the coldest expert of its layer cold: read back from the screenshot's pixels
    from PIL import Image

    img = Image.open(png).convert("RGB")
    assert img.size == (1600, 1200)

    def cell(layer_row: int, expert: int) -> tuple[int, int, int]:
        x = heat["x"] + (expert + 0.5) * heat["cell_w"]
        y = heat["y"] + (layer_row + 0.5) * heat["cell_h"]
        assert 0 <= x < img.size[0] and 0 <= y < img.size[1], "the heatmap is in the first screen"
        return img.getpixel((int(x), int(y)))

    hot = cell(row, HOT_EXPERT)
    cold = cell(row, int(np.argmin(state["load"][row])))
    assert hot[0] > 220 and hot[1] > 180, hot  # the top of the scale: light yellow
    assert sum(cold) < 150, cold  # the bottom: dark blue
    assert layout["reps"]["rows"] == len(LAYERS) and layout["reps"]["cols"] == E

    # the layers table: a row per layer, in a box that scrolls rather than growing the page
    assert page.rows == [str(layer) for layer in LAYERS]
    box = layout["layers_box"]
    assert box["client_h"] <= 420 < box["scroll_h"], box
    chips = [c for c in page.chips if c["layer"] == str(HOT_LAYER)]
    assert chips[0]["expert"] == str(HOT_EXPERT) and abs(float(chips[0]["share"]) - HOT_SHARE) < 0.01
    replicas = {tuple(k): len(v) for k, v in server.facts["placement"].replicas().items()}
    assert int(chips[0]["replicas"]) == replicas[(HOT_LAYER, HOT_EXPERT)] >= 2  # EPLB gave the hot expert copies

    # the placement map: a tile per device, the down one marked, all of them within a screen's height
    assert sorted(page.cards) == sorted(_devices())
    assert "down" in page.cards[DOWN].split() and sum("down" in c.split() for c in page.cards.values()) == 1
    assert page.warnings == 1  # the down device; no layer collapsed
    assert layout["devices"]["tiles"] == GPUS and layout["devices"]["height"] <= 1200, layout["devices"]
    assert png.stat().st_size > 50_000
