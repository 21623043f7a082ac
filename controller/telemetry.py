"""What the fleet measured, as one snapshot: the source of /metrics, the dashboard, ``status`` and the demo.

Everything here reads only what the fleet keeps in its store (``read_inputs``,
``InputsReader``: ``telemetry_inputs.py``) and turns it into plain data with pure functions (``build_snapshot``,
``rates``, ``metric_families``), so the same numbers come out wherever it runs:
in local mode beside the fleet, beside the controller on a cluster, or in a
``moe-fleet status`` run on a laptop.

Words and shapes (L MoE layers, E experts per layer, D devices):

routed load ``load [L][E]``
    token-expert assignments the routers sent to each expert over the last
    ``recent_windows`` complete load windows (``recent_s`` seconds).
measured device load
    rows each worker *served* per layer over its own last few seconds
    (``recent_tokens`` in its heartbeat): what the devices did, not what the
    planner predicted.
balancedness of a layer
    ``mean_d(load_d) / max_d(load_d)`` over the placement's devices, from the
    measured device load: the definition SGLang and vLLM use. 1 is perfectly
    even; 1/D is everything on one device. Undefined (None) without traffic.
routing entropy of a layer
    ``H(p) / ln(E)`` with ``p`` the routed load's share per expert: 1 for
    uniform routing, ``ln(K) / ln(E)`` when every token picks the same K
    experts. Below ``collapse_entropy`` (with at least
    ``collapse_min_tokens`` routed) the layer's routing has *collapsed* onto
    few experts, and the snapshot carries a warning.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moefleet.core.placement import ExpertKey, Placement
from moefleet.core.request_stats import LATENCY_BUCKETS_S

from .telemetry_inputs import REBALANCE_COUNTERS, FleetInputs, InputsReader, read_inputs  # noqa: F401  (re-exported)

__all__ = [
    "REBALANCE_BUCKETS_S",
    "FleetInputs",
    "InputsReader",
    "TelemetryConfig",
    "build_snapshot",
    "histogram_quantile",
    "metric_families",
    "rates",
    "read_inputs",
    "totals_table",
    "rebalance_increments",
]

REBALANCE_BUCKETS_S: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Upper bounds (seconds) of the ``moefleet_rebalance_seconds`` histogram; +Inf follows."""

EVENT_KINDS = ("leader", "worker_down", "worker_restart", "device_lost", "converge", "placement_recovered", "rebalance_resumed",
               "unload_deferred", "prediction_miss")
"""Event kinds listed for operators (published placements and the controller's per-step ``plan`` reports feed the
rebalance log instead; ``plan_skipped`` events, one per step a plan is held back, are not listed)."""


class TelemetryConfig(BaseModel):
    """How the snapshot is taken and what the endpoint exports."""

    model_config = ConfigDict(extra="forbid")

    window_s: float = Field(default=1.0, gt=0, description="Width of the routers' load windows (RouterConfig.load_window_s).")
    recent_windows: int = Field(default=5, gt=0, description="Complete load windows summed into the recent routed load.")
    expert_metrics: bool = Field(
        default=True,
        description="Export the per-(layer, expert) series (moefleet_expert_tokens_total, moefleet_expert_replicas); "
        "turn off for very large models (L x E label sets). Per-layer and per-device series stay.",
    )
    collapse_entropy: float = Field(
        default=0.55, gt=0, le=1, description="A layer whose normalised routing entropy falls below this has collapsed."
    )
    collapse_min_tokens: int = Field(default=100, ge=0, description="Routed tokens a layer needs before collapse is judged.")
    hot_experts: int = Field(default=5, gt=0, description="Hottest experts listed per layer (and fleet-wide, twice as many).")
    events: int = Field(default=300, gt=0, description="Newest store events read per snapshot.")
    sample_interval_s: float = Field(default=1.0, gt=0, description="The endpoint takes a snapshot this often.")
    history: int = Field(default=600, gt=0, description="Snapshots' summaries the endpoint keeps for the timeline.")


def controller_status(leader: str | None, record: dict) -> dict:
    """``state``, ``reason`` and ``detail`` of the controller as its leader last stored them (``Controller.set_status``);
    with no leader, state ``none``: no controller runs (a static fleet), or none holds the lease."""
    if not leader:
        return {"state": "none", "reason": "no controller holds the lease", "detail": ""}
    status = record.get("status") or {}
    return {"state": status.get("state", "starting"), "reason": status.get("reason", ""), "detail": status.get("detail", "")}


def rebalance_increments(seconds: float | None, loads: int, bytes_moved: int) -> dict[str, float]:
    """What one rebalance adds to the store's ``REBALANCE_COUNTERS``.

    ``seconds=None`` counts weight copies made outside a rebalance (the
    controller converging workers onto the placement): bytes only.
    """
    out: dict[str, float] = {"loads": loads, "bytes": bytes_moved}
    if seconds is not None:
        out.update(count=1, seconds=seconds)
        for b in REBALANCE_BUCKETS_S:
            if seconds <= b:
                out[f"le:{b!r}"] = 1
    return out


# --------------------------------------------------------------------------- pure helpers


def normalised_entropy(counts: list[float]) -> float | None:
    """``H(p) / ln(E)`` of the distribution ``counts`` ([E]); None without counts or with one expert."""
    total = float(sum(counts))
    if total <= 0 or len(counts) < 2:
        return None
    h = -sum((c / total) * math.log(c / total) for c in counts if c > 0)
    return max(0.0, min(1.0, h / math.log(len(counts))))


def balancedness(loads: list[float]) -> float | None:
    """``mean / max`` of per-device loads ([D]); None when no device has load."""
    if not loads or max(loads) <= 0:
        return None
    return (sum(loads) / len(loads)) / max(loads)


def histogram_quantile(q: float, bounds: tuple[float, ...] | list[float], counts: list[float]) -> float | None:
    """The ``q`` quantile of a histogram, as Prometheus' ``histogram_quantile`` estimates it.

    ``counts``: [B + 1] non-cumulative counts, the last one above ``bounds[-1]``.
    Linear within a bucket; a quantile in the +Inf bucket answers the largest bound.
    """
    total = float(sum(counts))
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lo = 0.0 if i == 0 else float(bounds[i - 1])
            return lo + (float(bounds[i]) - lo) * ((rank - seen) / c)
        seen += c
    return float(bounds[-1])


def _layers_and_experts(inputs: FleetInputs, model: dict | None) -> tuple[list[int], int]:
    if model and model.get("moe_layers"):
        return [int(x) for x in model["moe_layers"]], int(model["num_experts"])
    keys: set[ExpertKey] = set(inputs.totals)
    if inputs.placement is not None:
        keys |= inputs.placement.experts()
    for _, counts in inputs.windows:
        keys |= set(counts)
    if not keys:
        return [], 0
    return sorted({k[0] for k in keys}), max(k[1] for k in keys) + 1


def totals_table(totals: dict[ExpertKey, int], layers: list[int], num_experts: int) -> list[list[int]]:
    """Per-expert totals as the snapshot's ``expert_tokens_total [L][E]`` (experts outside the table dropped)."""
    row = {layer: i for i, layer in enumerate(layers)}
    out = [[0] * num_experts for _ in layers]
    for (layer, expert), n in totals.items():
        if layer in row and 0 <= expert < num_experts:
            out[row[layer]][expert] = int(n)
    return out


def _by_layer(keys: list[ExpertKey]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, expert in keys:
        out.setdefault(int(layer), []).append(int(expert))
    return {layer: sorted(es) for layer, es in sorted(out.items())}


def _sum_histograms(hists: list[dict]) -> dict:
    counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
    total = 0.0
    for h in hists:
        c = h.get("counts") or []
        if len(c) != len(counts):
            continue  # another build's buckets: not comparable
        counts = [a + b for a, b in zip(counts, c)]
        total += float(h.get("sum", 0.0))
    return {"counts": counts, "sum": total, "count": sum(counts)}


# --------------------------------------------------------------------------- snapshot


def build_snapshot(inputs: FleetInputs, config: TelemetryConfig) -> dict[str, Any]:
    """The fleet as measured, as JSON-ready plain data (see the module docstring for the words).

    Keys: ``t``, ``model``, ``layers [L]``, ``num_experts``, ``recent_s``,
    ``load [L][E]``, ``replicas [L][E]``, ``expert_tokens_total [L][E]``,
    ``placement``, ``layer_stats [L]``, ``hottest``, ``balancedness``,
    ``devices``, ``routers``, ``requests``, ``rebalances``, ``controller``,
    ``rebalance_log``, ``events``, ``warnings``.
    """
    workers = {k.split(":", 1)[1]: v for k, v in inputs.heartbeats.items() if k.startswith("worker:")}
    routers = {k.split(":", 1)[1]: v for k, v in inputs.heartbeats.items() if k.startswith("router:")}
    model = next((r.get("model") for r in routers.values() if r.get("model")), None)
    layers, num_experts = _layers_and_experts(inputs, model)
    row = {layer: i for i, layer in enumerate(layers)}
    placement = inputs.placement or Placement()

    # routed load over the complete recent windows (the last window is still filling)
    complete = inputs.windows[:-1] if len(inputs.windows) > 1 else inputs.windows
    load = [[0] * num_experts for _ in layers]
    for _, counts in complete:
        for (layer, expert), n in counts.items():
            if layer in row and 0 <= expert < num_experts:
                load[row[layer]][expert] += int(n)
    totals = totals_table(inputs.totals, layers, num_experts)
    replicas = [[0] * num_experts for _ in layers]
    for (layer, expert), devs in placement.replicas().items():
        if layer in row and 0 <= expert < num_experts:
            replicas[row[layer]][expert] = len(devs)

    # devices: the placement's, and any worker heartbeating
    device_ids = sorted(set(placement.assignments) | set(workers))
    devices = []
    for d in device_ids:
        info = workers.get(d, {})
        held = placement.assignments.get(d, [])
        recent = (info.get("recent_tokens") or {}).get("layers", {})
        accel = info.get("accelerator") or {}
        devices.append({
            "id": d,
            "live": d in workers,
            "in_placement": d in placement.assignments,
            "accelerator": accel.get("name") or info.get("device"),
            "capacity_bytes": accel.get("memory_bytes"),
            "cpus": info.get("cpus") or [],
            "backend": info.get("backend"),
            "memory_bytes": int(info.get("memory_bytes", 0)),
            "reserved_bytes": int(info.get("reserved_bytes", 0)),
            "queue_depth": int(info.get("queue_depth", 0)),
            "tokens_total": int(info.get("tokens_total", 0)),
            "recent_window_s": float((info.get("recent_tokens") or {}).get("window_s", 0.0)),
            "recent_tokens": {int(k): int(v) for k, v in recent.items()},
            "experts": len(held),
            "experts_by_layer": _by_layer(held),
        })
    recent_sum = sum(sum(dv["recent_tokens"].values()) for dv in devices)
    for dv in devices:
        dv["recent_total"] = sum(dv["recent_tokens"].values())
        dv["load_share"] = dv["recent_total"] / recent_sum if recent_sum else 0.0

    # per layer: measured balancedness over the placement's devices, routing entropy, hottest experts
    in_placement = [dv for dv in devices if dv["in_placement"]] or devices
    layer_stats = []
    warnings: list[str] = []
    for i, layer in enumerate(layers):
        tokens = sum(load[i])
        ent = normalised_entropy(load[i])
        collapsed = ent is not None and tokens >= config.collapse_min_tokens and ent < config.collapse_entropy
        order = sorted(range(num_experts), key=lambda e: (-load[i][e], e))
        hot = [{"expert": e, "tokens": load[i][e], "share": load[i][e] / tokens if tokens else 0.0,
                "replicas": replicas[i][e]} for e in order[: config.hot_experts] if load[i][e] > 0]
        bal = balancedness([float(dv["recent_tokens"].get(layer, 0)) for dv in in_placement])
        layer_stats.append({"layer": layer, "tokens": tokens, "balancedness": bal, "entropy": ent, "collapsed": collapsed,
                            "hot": hot})
        if collapsed:
            top = [h["expert"] for h in hot if h["share"] >= 0.05]
            warnings.append(f"layer {layer}: routing collapsed onto experts {top} (normalised entropy {ent:.3f} "
                            f"< {config.collapse_entropy})")
    defined = [s["balancedness"] for s in layer_stats if s["balancedness"] is not None]
    hottest = sorted(
        ({"layer": layers[i], "expert": e, "tokens": load[i][e], "share": load[i][e] / max(sum(load[i]), 1),
          "replicas": replicas[i][e]} for i in range(len(layers)) for e in range(num_experts) if load[i][e] > 0),
        key=lambda h: (-h["tokens"], h["layer"], h["expert"]),
    )[: 2 * config.hot_experts]
    for dv in devices:
        if dv["in_placement"] and not dv["live"]:
            warnings.append(f"device {dv['id']}: no heartbeat (worker down); its experts are being re-placed")

    # routers: requests by code, per-layer latency histograms, tokens computed (cumulative, summed)
    by_code: dict[str, int] = {}
    per_layer: dict[int, list[dict]] = {}
    router_rows = []
    for rid, info in sorted(routers.items()):
        st = info.get("stats") or {}
        for code, n in (st.get("codes") or {}).items():
            by_code[code] = by_code.get(code, 0) + int(n)
        for layer, h in (st.get("layer_latency") or {}).items():
            per_layer.setdefault(int(layer), []).append(h)
        tr = info.get("transport") or {}
        overhead = info.get("call_overhead") or None
        router_rows.append({"id": rid, "kind": info.get("kind"), "address": info.get("address"),
                            "placement_version": info.get("placement_version"), "requests": int(st.get("requests", 0)),
                            "tokens_computed": int(st.get("tokens_computed", 0)),
                            "transport": tr.get("kind"), "graph": bool(tr.get("graph")),
                            "bytes": dict(tr.get("bytes") or {}),
                            "call_overhead_s": list(overhead) if overhead else None,
                            "call_overhead_buckets": info.get("call_overhead_buckets")})
    latency = {layer: _sum_histograms(hs) for layer, hs in sorted(per_layer.items())}
    requests = {
        "by_code": dict(sorted(by_code.items())),
        "total": sum(by_code.values()),
        "errors": sum(n for c, n in by_code.items() if c != "OK"),
        "tokens_computed": sum(r["tokens_computed"] for r in router_rows),
        "bounds": list(LATENCY_BUCKETS_S),
        "latency": latency,
        "all_layers": _sum_histograms(list(latency.values())) if latency else _sum_histograms([]),
    }

    c = inputs.counters
    rebalances = {
        "total": int(c.get("count", 0)),
        "seconds_sum": float(c.get("seconds", 0.0)),
        "bytes_moved": int(c.get("bytes", 0)),
        "loads": int(c.get("loads", 0)),
        "buckets": [[b, int(c.get(f"le:{b!r}", 0))] for b in REBALANCE_BUCKETS_S],  # cumulative
    }

    # rebalance log: each published placement with the controller's report of the step that made it
    reports = {e["data"].get("applied_version"): e["data"] for e in inputs.events
               if e["kind"] == "plan" and e["data"].get("applied_version")}
    done = {e["data"].get("version"): e["data"] for e in inputs.events if e["kind"] == "rebalance"}  # its start and end
    log = []
    for e in inputs.events:
        if e["kind"] != "placement":
            continue
        d, rep = e["data"], reports.get(e["data"].get("version"), {})
        end = done.get(d.get("version"), {})
        seconds = end["ended_at"] - end["started_at"] if "ended_at" in end and "started_at" in end else rep.get("apply_seconds")
        log.append({"at": e["at"], "version": d.get("version"), "reason": d.get("reason", ""), "loads": d.get("loads", 0),
                    "bytes": d.get("bytes", end.get("bytes_moved")), "seconds": seconds,
                    "balancedness_before": rep.get("balancedness_before"), "balancedness_after": rep.get("balancedness_after"),
                    "gain": rep.get("gain")})
    events = [e for e in inputs.events if e["kind"] in EVENT_KINDS][-20:]
    record = inputs.controller or {}
    phase = (inputs.rebalance or {}).get("phase")
    return {
        "t": inputs.now,
        "model": model,
        "layers": layers,
        "num_experts": num_experts,
        "recent_s": len(complete) * config.window_s,
        "load": load,
        "replicas": replicas,
        "expert_tokens_total": totals,
        "placement": {
            "version": placement.version,
            "generation": placement.generation,
            "assignments": {dv["id"]: {str(layer): es for layer, es in dv["experts_by_layer"].items()} for dv in devices},
        },
        "layer_stats": layer_stats,
        "hottest": hottest,
        "balancedness": sum(defined) / len(defined) if defined else None,
        "min_balancedness": min(defined) if defined else None,
        "devices": [{k: v for k, v in dv.items() if k != "experts_by_layer"} for dv in devices],
        "routers": router_rows,
        "transport": transport_summary(router_rows),
        "requests": requests,
        "rebalances": rebalances,
        "controller": {"leader": inputs.leader, "last_report": record.get("last_report"), "rebalance_phase": phase,
                       "prediction": record.get("prediction"), **controller_status(inputs.leader, record)},
        "rebalance_log": log[-50:],
        "events": events,
        "warnings": warnings,
    }


def transport_summary(router_rows: list[dict]) -> dict[str, Any]:
    """Bytes the routers' calls moved (``to_workers`` / ``from_workers`` by transport, summed over routers) and the
    mean call overhead (a call's time less its slowest worker's compute), from the routers' heartbeats."""
    moved: dict[str, dict[str, int]] = {}
    total_s = calls = 0.0
    for r in router_rows:
        for key, n in (r.get("bytes") or {}).items():
            direction, _, transport = key.partition(":")
            moved.setdefault(direction, {})
            moved[direction][transport] = moved[direction].get(transport, 0) + int(n)
        if r.get("call_overhead_s"):
            total_s += float(r["call_overhead_s"][0])
            calls += float(r["call_overhead_s"][1])
    return {"bytes": moved, "calls": int(calls), "call_overhead_mean_s": total_s / calls if calls else None}


def rates(before: dict, after: dict) -> dict[str, float | None]:
    """Per-second rates and latency quantiles between two snapshots of one fleet (``before`` older).

    tokens_per_s: tokens the routers computed; requests_per_s / errors_per_s:
    answered requests, all and non-OK; p50_s / p99_s: of the requests answered
    in between (all layers), from the histogram buckets.
    """
    dt = after["t"] - before["t"]
    out: dict[str, float | None] = {"seconds": dt, "tokens_per_s": None, "requests_per_s": None, "errors_per_s": None,
                                    "p50_s": None, "p99_s": None}
    if dt <= 0:
        return out
    ra, rb = after["requests"], before["requests"]
    # counters restart with a router: a drop is read as a reset, as Prometheus does
    def delta(a: float, b: float) -> float:
        return a - b if a >= b else a

    out["tokens_per_s"] = delta(ra["tokens_computed"], rb["tokens_computed"]) / dt
    out["requests_per_s"] = delta(ra["total"], rb["total"]) / dt
    out["errors_per_s"] = delta(ra["errors"], rb["errors"]) / dt
    ca, cb = ra["all_layers"]["counts"], rb["all_layers"]["counts"]
    counts = [max(0, a - b) for a, b in zip(ca, cb)] if sum(ca) >= sum(cb) else list(ca)
    out["p50_s"] = histogram_quantile(0.5, ra["bounds"], counts)
    out["p99_s"] = histogram_quantile(0.99, ra["bounds"], counts)
    return out


# --------------------------------------------------------------------------- Prometheus


def metric_families(snap: dict, config: TelemetryConfig):
    """The fleet's Prometheus metric families from a snapshot (names as the README lists them)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    layers, num_experts = snap["layers"], snap["num_experts"]
    if config.expert_metrics:
        tok = CounterMetricFamily("moefleet_expert_tokens_total", "Tokens routed to each expert since the store began",
                                  labels=["layer", "expert"])
        rep = GaugeMetricFamily("moefleet_expert_replicas", "Replicas of each expert in the current placement",
                                labels=["layer", "expert"])
        for i, layer in enumerate(layers):
            for e in range(num_experts):
                tok.add_metric([str(layer), str(e)], float(snap["expert_tokens_total"][i][e]))
                rep.add_metric([str(layer), str(e)], float(snap["replicas"][i][e]))
        yield tok
        yield rep
    bal = GaugeMetricFamily("moefleet_layer_balancedness",
                            "Mean over max of the tokens each device served for the layer (measured, last seconds)",
                            labels=["layer"])
    ent = GaugeMetricFamily("moefleet_routing_entropy",
                            "Normalised entropy of the layer's routed load (1 uniform; low: routing collapsed)", labels=["layer"])
    col = GaugeMetricFamily("moefleet_routing_collapsed", "1 when the layer's routing collapsed onto few experts",
                            labels=["layer"])
    for s in snap["layer_stats"]:
        if s["balancedness"] is not None:
            bal.add_metric([str(s["layer"])], s["balancedness"])
        if s["entropy"] is not None:
            ent.add_metric([str(s["layer"])], s["entropy"])
        col.add_metric([str(s["layer"])], 1.0 if s["collapsed"] else 0.0)
    yield bal
    yield ent
    yield col
    dtok = CounterMetricFamily("moefleet_device_tokens_total", "Rows each device's worker computed (since it started)",
                               labels=["device"])
    dmem = GaugeMetricFamily("moefleet_device_memory_bytes", "Expert weight bytes each device holds", labels=["device"])
    for dv in snap["devices"]:
        if dv["live"]:
            dtok.add_metric([dv["id"]], float(dv["tokens_total"]))
            dmem.add_metric([dv["id"]], float(dv["memory_bytes"]))
    yield dtok
    yield dmem
    rb = snap["rebalances"]
    yield CounterMetricFamily("moefleet_rebalances_total", "Rebalances applied (placements published by the controller)",
                              value=float(rb["total"]))
    h = HistogramMetricFamily("moefleet_rebalance_seconds", "Duration of each rebalance, load to unload")
    h.add_metric([], buckets=[(repr(float(b)), float(n)) for b, n in rb["buckets"]] + [("+Inf", float(rb["total"]))],
                 sum_value=rb["seconds_sum"])
    yield h
    yield CounterMetricFamily("moefleet_weight_bytes_moved_total", "Expert weight bytes copied onto devices by the controller",
                              value=float(rb["bytes_moved"]))
    req = CounterMetricFamily("moefleet_requests_total", "Requests answered by the routers, by gRPC status", labels=["code"])
    for code, n in snap["requests"]["by_code"].items():
        req.add_metric([code], float(n))
    yield req
    lat = HistogramMetricFamily("moefleet_layer_latency_seconds", "Latency of answered layer calls at the routers",
                                labels=["layer"])
    bounds = snap["requests"]["bounds"]
    for layer, hist in snap["requests"]["latency"].items():
        cum, buckets = 0, []
        for b, n in zip(bounds, hist["counts"]):
            cum += n
            buckets.append((repr(float(b)), float(cum)))
        buckets.append(("+Inf", float(hist["count"])))
        lat.add_metric([str(layer)], buckets=buckets, sum_value=hist["sum"])
    yield lat
    prediction = (snap.get("controller") or {}).get("prediction")
    if prediction is not None and prediction.get("error") is not None:
        yield GaugeMetricFamily(
            "moefleet_prediction_error",
            "Measured minus predicted balancedness after the last rebalance (the planner's model on the same load)",
            value=float(prediction["error"]),
        )
    yield GaugeMetricFamily("moefleet_placement_version", "Version of the current placement",
                            value=float(snap["placement"]["version"]))
    tb = CounterMetricFamily("moefleet_transport_bytes", "Bytes layer calls moved between routers and workers, per router "
                             "(cost model: moefleet.core.cost_model)", labels=["router", "direction", "transport"])
    oh = HistogramMetricFamily("moefleet_call_overhead_seconds", "A layer call's time less its slowest worker's compute",
                               labels=["router"])
    for r in snap.get("routers", []):
        for key, n in sorted((r.get("bytes") or {}).items()):
            direction, _, transport = key.partition(":")
            tb.add_metric([r["id"], direction, transport], float(n))
        if r.get("call_overhead_s") and r.get("call_overhead_buckets"):
            oh.add_metric([r["id"]], buckets=[(b, float(n)) for b, n in r["call_overhead_buckets"]],
                          sum_value=float(r["call_overhead_s"][0]))
    yield tb
    yield oh
