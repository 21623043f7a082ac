"""Terminal views of a fleet snapshot (``controller/telemetry.py``): ``moe-fleet status`` and the demo.

Pure rendering: a snapshot (and the rates between two) in, ``rich``
renderables out, at most 100 columns wide. Big models are summarised, not
listed: per-layer rows (the least balanced first past ``max_layers``), the
hottest experts fleet-wide, one row per device.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

WIDTH = 100
SPARK = "▁▂▃▄▅▆▇█"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "–"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{int(b)} B"


def fmt_num(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:,.0f}"


def fmt_ms(s: float | None) -> str:
    return "–" if s is None else f"{s * 1000:.1f} ms"


def fmt2(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def ago(t: float, now: float) -> str:
    d = max(0.0, now - t)
    return f"{d:.0f}s ago" if d < 90 else f"{d / 60:.0f}m ago" if d < 5400 else f"{d / 3600:.1f}h ago"


def sparkline(values: list[float | None], width: int = 30) -> str:
    """Values in [0, 1] as block characters (None as a space), the newest last."""
    out = []
    for v in values[-width:]:
        out.append(" " if v is None else SPARK[min(len(SPARK) - 1, max(0, int(v * (len(SPARK) - 1) + 0.5)))])
    return "".join(out)


def hot_cells(hot: list[dict], limit: int = 4) -> str:
    """'e3 22% ×2  e4 20% ×2' — the hottest experts of a layer with their replica counts."""
    return "  ".join(f"e{h['expert']} {100 * h['share']:.0f}% ×{h['replicas']}" for h in hot[:limit]) or "no traffic"


def titled(title: str, table: Table) -> Group:
    """A table under a bold one-line title (as wide as the screen, not the table)."""
    return Group(Text(title, style="bold", overflow="ellipsis", no_wrap=True), table)


def header(snap: dict, rates: dict | None) -> Text:
    m = snap.get("model") or {}
    layers, e = snap["layers"], snap["num_experts"]
    model = f"{m['family']}, {len(layers)} MoE layers × {e} experts, top-{m['top_k']}" if m else f"{len(layers)} layers × {e} experts"
    r = rates or {}
    req = snap["requests"]
    leader = snap["controller"]["leader"] or "none (static)"
    t = Text()
    t.append("MoE Fleet ", style="bold")
    t.append(f"{model} · placement v{snap['placement']['version']}\n")
    t.append(f"tokens/s {fmt_num(r.get('tokens_per_s'))} · p50 {fmt_ms(r.get('p50_s'))} · p99 {fmt_ms(r.get('p99_s'))} · "
             f"requests {req['total']:,} ({req['errors']:,} failed) · balancedness {fmt2(snap['balancedness'])} "
             f"(min {fmt2(snap['min_balancedness'])})\n")
    rb = snap["rebalances"]
    t.append(f"rebalances {rb['total']} · weight moved {fmt_bytes(rb['bytes_moved'])} · controller leader {leader}")
    phase = snap["controller"].get("rebalance_phase")
    if phase:
        t.append(f" · rebalance in progress: {phase}", style="yellow")
    t.append_text(controller_line(snap["controller"]))
    floor = (snap["controller"].get("last_report") or {}).get("min_replicas")
    if floor:
        t.append(f"\nreplicas per expert: at least {floor['replicas']} ({floor['why']})")
    if snap.get("store_error"):
        t.append(f"\nstore unreachable: {snap['store_error']}", style="bold red")
    for w in snap["warnings"]:
        t.append(f"\n⚠ {w}", style="bold red")
    return t


CONTROLLER_STYLES = {"blocked": "bold red", "failing": "bold red", "repairing": "yellow", "waiting": "yellow"}


def controller_line(ctl: dict) -> Text:
    """'\ncontroller blocked: no live device — the inventory is empty: ...' (state, reason, detail)."""
    state = ctl.get("state")
    t = Text()
    if not state:
        return t
    t.append("\ncontroller ")
    t.append(f"{state}: {ctl.get('reason') or ''}".rstrip(": "), style=CONTROLLER_STYLES.get(state, ""))
    if ctl.get("detail"):
        t.append(f" — {ctl['detail']}")
    return t


def layer_table(snap: dict, max_layers: int = 16, title: str | None = None) -> Group:
    stats = snap["layer_stats"]
    shown = stats
    note = ""
    if len(stats) > max_layers:
        key = lambda s: (s["balancedness"] if s["balancedness"] is not None else 2.0, s["layer"])  # noqa: E731
        shown = sorted(sorted(stats, key=key)[:max_layers], key=lambda s: s["layer"])
        note = f" — the {max_layers} least balanced of {len(stats)} (--all-layers)"
    heading = title or f"Layers: routed load of the last {snap['recent_s']:.0f} s, measured balancedness{note}"
    t = Table(expand=False, box=None, padding=(0, 1))
    t.add_column("layer", justify="right")
    t.add_column("tokens", justify="right")
    t.add_column("balanced", justify="right")
    t.add_column("entropy", justify="right")
    t.add_column("hottest experts (share ×replicas)", no_wrap=True, overflow="ellipsis", max_width=60)
    for s in shown:
        ent = fmt2(s["entropy"]) + (" collapsed" if s["collapsed"] else "")
        t.add_row(str(s["layer"]), fmt_num(s["tokens"]), fmt2(s["balancedness"]), Text(ent, style="bold red" if s["collapsed"] else ""),
                  hot_cells(s["hot"]))
    return titled(heading, t)


def hottest_table(snap: dict) -> Group:
    t = Table(box=None, padding=(0, 1))
    for c in ("layer", "expert", "tokens", "share of layer", "replicas"):
        t.add_column(c, justify="right")
    for h in snap["hottest"]:
        t.add_row(str(h["layer"]), str(h["expert"]), fmt_num(h["tokens"]), f"{100 * h['share']:.0f}%", str(h["replicas"]))
    return titled("Hottest experts, fleet-wide", t)


def device_table(snap: dict) -> Group:
    t = Table(box=None, padding=(0, 1))
    t.add_column("device", no_wrap=True, overflow="ellipsis", max_width=22)
    t.add_column("type", no_wrap=True, overflow="ellipsis", max_width=18)
    for c in ("replicas", "memory", "load", "rows/s", "queue", "state"):
        t.add_column(c, justify="right")
    for d in snap["devices"]:
        kind = f"cpu cores {','.join(map(str, d['cpus']))}" if d["accelerator"] == "cpu" and d["cpus"] else str(d["accelerator"] or "?")
        cap = f" of {fmt_bytes(d['capacity_bytes'])}" if d["capacity_bytes"] else f", {fmt_bytes(d['reserved_bytes'])} res."
        rate = d["recent_total"] / d["recent_window_s"] if d["recent_window_s"] else None
        state = "live" if d["live"] else Text("DOWN", style="bold red")
        t.add_row(d["id"], kind, str(d["experts"]), fmt_bytes(d["memory_bytes"]) + cap, f"{100 * d['load_share']:.0f}%",
                  fmt_num(rate), str(d["queue_depth"]), state)
    return titled("Devices: memory held (reserved) and the load each measured", t)


def router_table(snap: dict) -> Group:
    """Each router: its kind, how it reaches its workers, bytes its calls moved each way, its mean call overhead."""
    t = Table(box=None, padding=(0, 1))
    t.add_column("router", no_wrap=True, overflow="ellipsis", max_width=26)
    t.add_column("kind", no_wrap=True)
    t.add_column("path", no_wrap=True)
    for c in ("requests", "to workers", "from workers", "overhead"):
        t.add_column(c, justify="right")
    for r in snap.get("routers", []):
        moved = r.get("bytes") or {}
        to = sum(n for k, n in moved.items() if k.startswith("to_workers:"))
        back = sum(n for k, n in moved.items() if k.startswith("from_workers:"))
        oh = r.get("call_overhead_s")
        mean = oh[0] / oh[1] if oh and oh[1] else None
        path = (r.get("transport") or "?") + (" (graph)" if r.get("graph") else "")
        t.add_row(r["id"], str(r.get("kind") or "?"), path, fmt_num(r.get("requests")), fmt_bytes(to), fmt_bytes(back), fmt_ms(mean))
    if not snap.get("routers"):
        t.add_row("none", "", "", "", "", "", "")
    return titled("Routers: how calls reach the workers, bytes moved, overhead per call (call less its workers' compute)", t)


def rebalance_table(snap: dict, limit: int = 5) -> Group:
    t = Table(box=None, padding=(0, 1))
    for c in ("when", "version", "before → after", "copies", "bytes", "seconds"):
        t.add_column(c, justify="right")
    t.add_column("why", no_wrap=True, overflow="ellipsis", max_width=24)
    for x in snap["rebalance_log"][-limit:][::-1]:
        secs = "–" if x["seconds"] is None else f"{x['seconds']:.2f}"
        t.add_row(ago(x["at"], snap["t"]), str(x["version"]), f"{fmt2(x['balancedness_before'])} → {fmt2(x['balancedness_after'])}",
                  str(x["loads"]), fmt_bytes(x["bytes"]), secs, x["reason"])
    if not snap["rebalance_log"]:
        t.add_row("none yet", "", "", "", "", "", "")
    return titled("Last rebalances (balancedness as the planner predicted it)", t)


def events_text(snap: dict, limit: int = 5) -> Text:
    t = Text("Events\n", style="bold")
    for e in snap["events"][-limit:][::-1]:
        data = " ".join(f"{k}={v}" for k, v in e["data"].items() if k not in ("holder", "at"))
        line = f"  {ago(e['at'], snap['t']):>8}  {e['kind']:<18} {data}"
        t.append(line[: WIDTH - 1] + "\n")
    if not snap["events"]:
        t.append("  none\n")
    return t


def status_view(snap: dict, rates: dict | None = None, *, all_layers: bool = False) -> Group:
    """``moe-fleet status``: header and warnings, layers, hottest experts, devices, rebalances, events."""
    if snap.get("t") is None:
        return Group(Text(f"no snapshot of the fleet yet: {snap.get('store_error') or 'the endpoint has not sampled the store'}",
                          style="bold red"))
    return Group(
        header(snap, rates if rates is not None else snap.get("rates")), Text(""),
        layer_table(snap, max_layers=10**9 if all_layers else 16), Text(""),
        hottest_table(snap), Text(""),
        device_table(snap), Text(""),
        router_table(snap), Text(""),
        rebalance_table(snap), Text(""),
        events_text(snap),
    )


def demo_view(
    snap: dict,
    rates: dict,
    *,
    elapsed_s: float,
    duration_s: float,
    driving: list[int],
    shift_s: float,
    history: list[float | None],
    rebalances: list[dict],
) -> Group:
    """The demo's screen: what the fleet measured while the demo drives traffic (100 columns at most).

    rebalances: rows of ``{"at_s", "version", "planned", "measured_before", "measured_after", "copies", "bytes", "seconds"}``.
    """
    req = snap["requests"]
    phase = int(elapsed_s // shift_s) if shift_s > 0 else 0
    since = elapsed_s - phase * shift_s
    top = Text()
    top.append("MoE Fleet demo ", style="bold")
    top.append(f"{elapsed_s:5.1f}s / {duration_s:.0f}s · shift {phase + 1}: traffic leans on experts {driving} "
               f"for {since:.0f}s (moves every {shift_s:.0f}s)\n")
    top.append(f"fleet measured: {fmt_num(rates.get('tokens_per_s'))} tokens/s · p50 {fmt_ms(rates.get('p50_s'))} · "
               f"p99 {fmt_ms(rates.get('p99_s'))} · {req['errors']:,} errors · placement v{snap['placement']['version']}\n")
    top.append(f"balancedness {fmt2(snap['balancedness'])} {sparkline(history, 40)}")
    for w in snap["warnings"]:
        top.append(f"\n⚠ {w}", style="bold red")
    counts: dict[int, int] = {}
    for st in snap["layer_stats"]:  # the experts most often among each layer's hottest: the hot set counted
        for h in st["hot"][:len(driving)]:
            counts[h["expert"]] = counts.get(h["expert"], 0) + 1
    measured = sorted(sorted(counts, key=lambda e: (-counts[e], e))[:len(driving)])
    lag = "" if set(measured) == set(driving) else f" — still {measured}, not yet {driving}"
    layers = layer_table(snap, max_layers=8, title=f"Hot experts the routers counted over the last {snap['recent_s']:.0f}s"
                         f"{lag} (share ×replicas), each layer's balancedness")
    rb = Table(box=None, padding=(0, 1))
    for c in ("at", "v", "planned", "measured", "copies", "bytes", "s"):
        rb.add_column(c, justify="right")
    for x in rebalances[-6:]:
        measured = f"{fmt2(x['measured_before'])} → {fmt2(x['measured_after'])}"
        rb.add_row(f"{x['at_s']:.1f}s", str(x["version"]), x["planned"], measured, str(x["copies"]), fmt_bytes(x["bytes"]),
                   "–" if x["seconds"] is None else f"{x['seconds']:.2f}")
    if not rebalances:
        rb.add_row("waiting", "", "", "", "", "", "")
    return Group(top, Text(""), layers, Text(""), titled("The controller at work: each rebalance", rb))
