"""The ``moe-fleet`` command line."""

from __future__ import annotations

import argparse
import sys
import time

from pydantic import ValidationError

from moefleet.core.checkpoint import CheckpointError


def _load(checkpoint: str | None):
    from moefleet import MoEModel

    return MoEModel.from_pretrained(checkpoint) if checkpoint else MoEModel.default()


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:,.2f} TiB"


def memory_rows(ckpt, dtype: str | None = None) -> list[dict]:
    """What a full copy of the model's MoE weights occupies, per way of holding it.

    One row per form a worker holds the experts in: packed on CUDA workers
    (Triton) when the checkpoint is quantized in a form a kernel takes, and
    float in ``dtype`` (default: the checkpoint's) elsewhere. Each row: where,
    the form, bytes per routed expert (of the first MoE layer), the routed
    experts of all MoE layers, the routers' part (gates and shared experts,
    float) and their sum, the full copy.
    """
    import torch

    from moefleet.kernels.experts import packed_kind

    spec = ckpt.spec
    dtype = dtype or spec.dtype
    size = torch.finfo(getattr(torch, dtype)).bits // 8
    router = 0
    for layer in spec.moe_layers:
        s = spec.layer_spec(layer)
        gate = s.num_experts * s.hidden_size + (s.num_experts if s.gate_bias else 0)
        shared = 3 * s.hidden_size * s.shared_intermediate_size + (s.hidden_size if s.shared_expert_gate else 0)
        router += (gate + shared) * size
    forms = [("CPU workers (torch)", "torch")]
    if ckpt.quant is not None:
        forms.insert(0, ("CUDA workers (Triton)", "triton"))
    rows = []
    for where, backend in forms:
        kinds = {packed_kind(ckpt, layer, backend) for layer in spec.moe_layers}
        per_layer = [
            ckpt.expert_bytes(layer, dtype, packed=packed_kind(ckpt, layer, backend) is not None) for layer in spec.moe_layers
        ]
        experts = sum(b * spec.layer_spec(layer).num_experts for b, layer in zip(per_layer, spec.moe_layers))
        kind = kinds.pop() if len(kinds) == 1 else "mixed"
        form = f"{kind} packed" if kind not in (None, "mixed") else (f"{dtype} (dequantized)" if ckpt.quant else dtype)
        rows.append({
            "where": where, "form": form, "bytes_per_expert": per_layer[0], "experts_bytes": experts,
            "router_bytes": router, "full_copy_bytes": experts + router,
        })
    return rows


def cmd_inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    model = _load(args.checkpoint)
    spec = model.spec
    console = Console()
    console.print(f"[bold]{spec.family}[/bold] at {model.checkpoint.path}")
    console.print(f"layers: {spec.num_layers}, MoE layers: {list(spec.moe_layers)}, dtype: {spec.dtype}")
    quant = spec.quantization
    console.print(f"quantization: {quant.label if quant else 'none'}")
    table = Table("field", "value", title="MoE layer spec")
    for name, value in spec.layer.model_dump().items():
        table.add_row(name, str(value))
    console.print(table)
    n_experts = sum(spec.layer_spec(layer).num_experts for layer in spec.moe_layers)
    mem = Table("held by", "form", "bytes per expert", f"routed experts ({n_experts})", "gates + shared", "full copy",
                title="memory of a full copy")
    for row in memory_rows(model.checkpoint, args.dtype):
        mem.add_row(row["where"], row["form"], f"{row['bytes_per_expert']:,}", _bytes(row["experts_bytes"]),
                    _bytes(row["router_bytes"]), _bytes(row["full_copy_bytes"]))
    console.print(mem)
    return 0


def cmd_demo_local(args) -> int:
    """In-process demo: route skewed traffic through each MoE layer of the model and show per-expert load."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from moefleet.demo import skewed_hidden
    from moefleet.kernels.routing import expert_token_counts

    console = Console()
    model = _load(args.checkpoint)
    spec = model.spec
    console.print(f"[bold]MoE Fleet[/bold] in-process demo: {spec.family}, MoE layers {list(spec.moe_layers)}, "
                  f"{spec.layer.num_experts} experts, top-{spec.layer.top_k}")
    g = torch.Generator().manual_seed(0)
    table = Table("layer", "tokens", "tokens/s", "hottest experts (tokens)", "max/mean load")
    for i in spec.moe_layers:
        layer = model.layer(i)
        hot = list(range(min(3, layer.spec.num_experts)))
        x = skewed_hidden(layer.gate.weight, args.tokens, hot, args.skew, g)
        layer(x[:8])  # warm-up
        t0 = time.perf_counter()
        out, routing = layer(x, return_routing=True)
        dt = time.perf_counter() - t0
        counts = expert_token_counts(routing.topk_ids, layer.spec.num_experts)
        top = torch.argsort(counts, descending=True)[:4]
        table.add_row(
            str(i), str(len(x)), f"{len(x) / dt:,.0f}", ", ".join(f"{int(e)} ({int(counts[e])})" for e in top),
            f"{float(counts.max()) / float(counts.float().mean()):.2f}",
        )
        assert torch.isfinite(out).all()
    console.print(table)
    return 0


def _read_state() -> dict | None:
    from moefleet.local import read_local_state

    return read_local_state()


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _min_replicas(text: str):
    """``--min-replicas``: 'auto' or an integer >= 1."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}")
    return value


def _fleet_config(args):
    from moefleet.core.config import FleetConfig, RouterConfig, WorkerConfig

    return FleetConfig(
        checkpoint=args.checkpoint, num_workers=args.workers, redis_url=args.redis_url,
        router=RouterConfig(port=args.port, **_security_settings(args)), worker=WorkerConfig(num_cpus=args.worker_cpus),
        static=args.static, min_replicas=args.min_replicas, http_port=None if args.http_port < 0 else args.http_port,
        emulate=args.emulate, emulate_slowdown=args.emulate_slowdown, emulate_model=args.emulate_model,
    )


SECURITY_FLAGS = ("auth_token_file", "tls_cert", "tls_key", "tls_client_ca")


def _security_settings(args) -> dict:
    """RouterConfig's token and TLS settings from ``up``'s flags (absolute paths: the fleet runs elsewhere)."""
    import os

    return {k: os.path.abspath(getattr(args, k)) for k in SECURITY_FLAGS if getattr(args, k, None)}


def _client_kwargs(args, state: dict | None) -> dict:
    """Token and TLS for the CLI's own calls: --tls-ca/--tls-cert/--tls-key, the local fleet's token file, else
    $MOEFLEET_AUTH_TOKEN (read by the client)."""
    from moefleet.core.secrets import read_secret_file

    kw = {k: getattr(args, k) for k in ("tls_ca", "tls_cert", "tls_key") if getattr(args, k, None)}
    token_file = (state or {}).get("auth_token_file")
    if token_file:
        kw["token"] = read_secret_file(token_file, "auth_token_file")
    return kw


def cmd_up(args) -> int:
    """Start a local fleet. By default in the background: prints the gRPC address and returns."""
    import os
    import subprocess

    from moefleet.local import state_file

    cfg = _fleet_config(args)  # validate before anything starts
    state = _read_state()
    if state:
        print(f"fleet already up: {state['address']} (pid {state['pid']}); 'moe-fleet down' stops it")
        return 0
    _check_http_port(args.http_port)
    if args.foreground:
        return _up_foreground(cfg, args)
    log_path = state_file().with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "moefleet.cli", "up", "--foreground", "--workers", str(args.workers), "--port", str(args.port),
            "--worker-cpus", str(args.worker_cpus)]
    for key, value in _security_settings(args).items():
        argv += ["--" + key.replace("_", "-"), value]
    if args.checkpoint:
        argv += ["--checkpoint", args.checkpoint]
    if args.redis_url:
        argv += ["--redis-url", args.redis_url]
    if args.static:
        argv += ["--static"]
    argv += ["--min-replicas", str(args.min_replicas), "--http-port", str(args.http_port)]
    if args.emulate:
        argv += ["--emulate", args.emulate, "--emulate-slowdown", repr(args.emulate_slowdown)]
        if args.emulate_model:
            argv += ["--emulate-model", args.emulate_model]
    with open(log_path, "wb") as log:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        state = _read_state()
        if state and state.get("pid") == child.pid:
            print(state["address"])
            if state.get("http_address"):
                print(f"http://{state['http_address']}/  (dashboard; /metrics, /api/state)")
            return 0
        if child.poll() is not None:
            print(f"moe-fleet: the fleet did not start; its log ({log_path}):", file=sys.stderr)
            print(log_path.read_text()[-4000:], file=sys.stderr)
            return 1
        time.sleep(0.5)
    child.terminate()
    print(f"moe-fleet: the fleet did not come up within {args.timeout}s; see {log_path}", file=sys.stderr)
    return 1


def _up_foreground(cfg, args) -> int:
    import json
    import os
    import signal
    import threading

    from moefleet.local import LocalFleet, init_local_ray, state_file

    init_local_ray(num_cpus=max(2, int(cfg.num_workers * cfg.worker.num_cpus) + 1))
    fleet = LocalFleet(cfg)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        address = fleet.start()
        from moefleet.core.secrets import redact_url, write_private_file

        import ray

        state = {"pid": os.getpid(), "address": address, "http_address": fleet.http_address,
                 "redis_url": fleet.redis_url, "namespace": cfg.namespace,
                 "ray_address": ray.get_runtime_context().gcs_address, "dtype": cfg.worker.dtype,
                 "checkpoint": fleet.checkpoint, "workers": list(fleet.workers), "static": cfg.static,
                 "devices": [d.model_dump(mode="json") for d in fleet.devices],
                 "auth_token_file": cfg.router.auth_token_file, "tls": cfg.router.tls_cert is not None}
        f = state_file()
        write_private_file(f, json.dumps(state, indent=2))  # the Redis URL holds its password: this user only
        owned = ", ".join(f"{d.device_id} cores {list(d.cpus)}" for d in fleet.devices if d.cpus)
        if cfg.emulate:
            owned = f"emulated {cfg.emulate} at {cfg.emulate_slowdown:g}x device time"
        print(f"fleet up: gRPC {address}, {len(fleet.workers)} workers{' (' + owned + ')' if owned else ''}, "
              f"controller {'off (--static)' if cfg.static else 'on'}, Redis {redact_url(fleet.redis_url)}, "
              f"telemetry {'http://' + fleet.http_address if fleet.http_address else 'off'}", flush=True)
        stop.wait()
    finally:
        fleet.stop()
        state_file().unlink(missing_ok=True)
        import ray

        ray.shutdown()
    return 0


def cmd_down(args) -> int:
    import os
    import signal

    state = _read_state()
    if not state:
        print("no local fleet is running")
        return 0
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while _alive(state["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(state["pid"]):
        os.kill(state["pid"], signal.SIGKILL)
    # return once the fleet's ports can be bound again (a router process may outlive the fleet's for a moment)
    from moefleet.core.ports import wait_bindable

    ports = [a for a in (state.get("address"), state.get("http_address")) if a]
    busy = wait_bindable(ports, max(1.0, deadline - time.monotonic()))
    if busy:
        print(f"moe-fleet: fleet at {state['address']} stopped, but still listened on: "
              + ", ".join(f"{a} ({e.strerror})" for a, e in busy.items()), file=sys.stderr)
        return 1
    print(f"fleet at {state['address']} stopped")
    return 0


def _address(args) -> tuple[str, dict | None]:
    state = _read_state()
    if args.address:
        return args.address, state
    if not state:
        raise SystemExit("moe-fleet: no local fleet is running (start one with 'moe-fleet up', or pass --address)")
    return state["address"], state


def _check_http_port(port: int) -> None:
    """Fail before anything starts when the telemetry port is taken, saying what to do."""
    import errno

    from moefleet.core.ports import bind_error

    if port <= 0:
        return
    e = bind_error("127.0.0.1", port)  # as the endpoint binds it: connections left in TIME_WAIT do not count
    if e is not None:
        hint = "another fleet's dashboard?" if e.errno == errno.EADDRINUSE else e.strerror
        raise SystemExit(f"moe-fleet: port {port} on 127.0.0.1 is not free ({hint}): pass --http-port with a free port, "
                         "0 for any, or -1 to serve no telemetry endpoint")


def _snapshot_source(args):
    """A callable returning the fleet's snapshot (controller/telemetry.py), and where it reads from.

    --url: a fleet's telemetry endpoint (its /api/state); --redis-url: read the
    store directly; default: the local fleet's endpoint, else its store.
    """
    import json
    import urllib.error
    import urllib.request

    url = getattr(args, "url", None)
    redis_url = getattr(args, "redis_url", None)
    if not url and not redis_url:
        state = _read_state()
        if not state:
            raise SystemExit("moe-fleet: no local fleet is running: start one with 'moe-fleet up', "
                             "or pass --url http://HOST:8470 (a fleet's telemetry endpoint) or --redis-url (its store)")
        if state.get("http_address"):
            url = f"http://{state['http_address']}"
        else:
            redis_url, args.namespace = state["redis_url"], state["namespace"]
    if url:
        base = url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            base = "http://" + base
        if base.endswith("/api/state"):
            base = base[: -len("/api/state")]

        def get() -> dict:
            try:
                with urllib.request.urlopen(base + "/api/state", timeout=10) as r:
                    return json.loads(r.read())
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise SystemExit(f"moe-fleet: cannot read {base}/api/state ({e}): is the fleet up and its telemetry "
                                 "endpoint at that address? ('moe-fleet up' prints it)") from None

        return get, base
    from moefleet.controller.telemetry import TelemetryConfig, build_snapshot, read_inputs
    from moefleet.core.state import StateStore, resolve_redis_url

    store = StateStore(resolve_redis_url(redis_url), namespace=args.namespace, socket_timeout_s=5.0)
    cfg = TelemetryConfig()
    return (lambda: build_snapshot(read_inputs(store, cfg), cfg)), store._safe_url


def cmd_status(args) -> int:
    """The fleet as it measured itself: layers, hottest experts, devices, rebalances, events (--json: the snapshot)."""
    import json

    from rich.live import Live

    from moefleet.controller.telemetry import rates
    from moefleet.demo import terminal
    from moefleet.views import status_view

    get, where = _snapshot_source(args)
    console = terminal()
    if args.interval <= 0:
        raise SystemExit(f"moe-fleet: --interval must be > 0 seconds, got {args.interval}")
    if not args.watch:
        snap = get()
        if args.json:
            print(json.dumps(snap))
        else:
            console.print(status_view(snap, all_layers=args.all_layers))
        return 0
    prev, n = None, 0
    try:
        if args.json:  # one snapshot a line
            while args.count is None or n < args.count:
                print(json.dumps(get()), flush=True)
                n += 1
                if args.count is None or n < args.count:
                    time.sleep(args.interval)
            return 0
        snap = get()
        with Live(status_view(snap, all_layers=args.all_layers), console=console, refresh_per_second=4) as live:
            while args.count is None or n < args.count:
                n += 1
                if args.count is not None and n >= args.count:
                    break
                time.sleep(args.interval)
                prev, snap = snap, get()
                r = snap.get("rates") or (rates(prev, snap) if prev.get("t") and snap.get("t") else None)
                live.update(status_view(snap, r, all_layers=args.all_layers))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_trace_record(args) -> int:
    """Record the fleet's routing, one JSONL line per (load window, layer), for --duration seconds."""
    from pathlib import Path

    from moefleet.controller.traces import record_windows
    from moefleet.core.state import StateStore, resolve_redis_url

    if args.duration <= 0:
        raise SystemExit(f"moe-fleet: --duration must be > 0 seconds, got {args.duration}")
    redis_url, namespace = args.redis_url, args.namespace
    if not redis_url:
        state = _read_state()
        if not state:
            raise SystemExit("moe-fleet: no local fleet is running: start one with 'moe-fleet up', or pass --redis-url "
                             "(and --namespace) of the fleet to record")
        redis_url, namespace = state["redis_url"], state["namespace"]
    store = StateStore(resolve_redis_url(redis_url), namespace=namespace, socket_timeout_s=5.0)
    layers, num_experts = _model_shape(store)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = windows = tokens = 0
    with out.open("w", encoding="utf-8") as f:
        print(f"recording {len(layers)} layers x {num_experts} experts from {store._safe_url} for {args.duration:g}s "
              f"into {out}", file=sys.stderr)
        for window in record_windows(store, args.duration, layers, num_experts, window_s=args.window, settle_s=args.settle):
            for line in window:
                f.write(line.to_json() + "\n")
                tokens += sum(line.counts)
            f.flush()
            lines += len(window)
            windows += 1
    print(f"{out}: {windows} windows of {args.window:g}s, {lines} lines, {tokens:,} routed tokens")
    return 0


def _model_shape(store) -> tuple[list[int], int]:
    """The fleet's MoE layers and experts per layer, as its routers report them (else from its placement)."""
    for key, info in store.workers().items():
        if key.startswith("router:") and info.get("model"):
            return [int(x) for x in info["model"]["moe_layers"]], int(info["model"]["num_experts"])
    placement = store.get_placement()
    if placement is None or not placement.assignments:
        raise SystemExit("moe-fleet: the fleet has no router heartbeating and no placement: is it up? "
                         "('moe-fleet status' shows what it reports)")
    keys = placement.experts()
    return sorted({k[0] for k in keys}), max(k[1] for k in keys) + 1


def _read_any_trace(path: str, period: float):
    """A JSONL routing trace, or an SGLang / vLLM expert-count dump (.pt / .json with their keys) as one."""
    from pathlib import Path

    from moefleet.core.expert_stats import counts_to_trace, load_expert_counts
    from moefleet.core.trace import TraceError, read_trace

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"moe-fleet: no trace file {p}: record one with 'moe-fleet trace record --out {p}'")
    if p.suffix in (".pt", ".pth"):
        return counts_to_trace(load_expert_counts(p), period)
    if p.suffix == ".json":
        try:  # a JSON expert-count dump; a JSONL trace of one line also parses as JSON, so try the dump first
            return counts_to_trace(load_expert_counts(p), period)
        except TraceError:
            pass
    return read_trace(p)


def cmd_trace_import(args) -> int:
    """Convert an SGLang / vLLM expert-distribution dump ([layers, experts] counts) into a JSONL trace."""
    from moefleet.core.expert_stats import counts_to_trace, load_expert_counts
    from moefleet.core.trace import write_trace

    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    trace = counts_to_trace(load_expert_counts(args.dump), args.period, layers)
    write_trace(args.out, trace)
    print(f"{args.out}: {len(trace)} lines, {len(trace.layers)} layers x {trace.num_experts} experts, "
          f"{int(trace.counts.sum()):,} tokens")
    return 0


def cmd_trace_replay(args) -> int:
    """Run the controller's planner over a trace; print what it would have done in each window."""
    import json
    from pathlib import Path

    from rich.table import Table

    from moefleet.controller.planner import PlannerKnobs
    from moefleet.controller.traces import replay
    from moefleet.core.placement import DeviceSpec, Inventory
    from moefleet.demo import terminal
    from moefleet.local import LOCAL_CONTROLLER_DEFAULTS
    from moefleet.views import fmt2, fmt_bytes

    trace = _read_any_trace(args.file, args.window or 1.0)
    if args.devices < 1:
        raise SystemExit(f"moe-fleet: --devices must be >= 1, got {args.devices}")
    expert_bytes = args.expert_bytes
    if expert_bytes is None:
        spec = _load(args.checkpoint).spec
        if trace.num_experts != spec.layer.num_experts:
            raise SystemExit(f"moe-fleet: the trace has {trace.num_experts} experts per layer, the model "
                             f"({spec.family}) {spec.layer.num_experts}: pass the trace's --checkpoint, or --expert-bytes")
        expert_bytes = spec.layer.expert_params * 4
    if expert_bytes <= 0:
        raise SystemExit(f"moe-fleet: --expert-bytes must be > 0, got {expert_bytes}")
    per_device = int(args.memory_gib * (1 << 30)) if args.memory_gib else int(
        2 * expert_bytes * trace.num_experts * len(trace.layers) / max(args.devices - 1, 1) / 0.9 + expert_bytes)
    inventory = Inventory(devices=[DeviceSpec(device_id=f"device-{i}", node_id="replay", kind="gpu", memory_bytes=per_device)
                                   for i in range(args.devices)])
    if args.config:
        import yaml

        from moefleet.controller.main import ControllerConfig

        config = ControllerConfig(**(yaml.safe_load(Path(args.config).read_text()) or {}))
    else:  # local mode's controller: reacts within seconds
        from moefleet.controller.main import ControllerConfig

        knobs = {k: v for k, v in LOCAL_CONTROLLER_DEFAULTS.items() if k in ("load_windows", "load_half_life_s", "min_tokens")}
        config = ControllerConfig(**knobs, ray_address=None,
                                  planner=PlannerKnobs(min_gain=args.min_gain, min_replicas=args.min_replicas))
    steps = replay(trace, inventory, expert_bytes=expert_bytes, config=config, window_s=args.window)
    if args.json:
        print(json.dumps({"devices": args.devices, "expert_bytes": expert_bytes, "layers": trace.layers,
                          "num_experts": trace.num_experts, "windows": [s.to_dict() for s in steps]}))
        return 0
    console = terminal()
    t = Table(title=f"{args.file}: {len(trace.layers)} layers x {trace.num_experts} experts on {args.devices} devices "
                    f"({fmt_bytes(per_device)} each): what the controller would have done", title_justify="left")
    for c in ("t", "tokens", "decision", "balancedness", "copies", "removes", "bytes", "version"):
        t.add_column(c, justify="right" if c not in ("decision",) else "left")
    for st in steps:
        t.add_row(f"{st.t:g}", f"{st.tokens:,}", st.decision, f"{fmt2(st.balancedness_before)} → {fmt2(st.balancedness_after)}",
                  str(st.copies), str(st.removes), fmt_bytes(st.bytes), str(st.version))
    console.print(t)
    applied = [s for s in steps if s.decision == "applied"]
    console.print(f"{len(steps)} windows, {len(applied)} rebalances, {sum(s.copies for s in applied)} copies, "
                  f"{fmt_bytes(sum(s.bytes for s in applied))} moved")
    return 0


def cmd_demo(args) -> int:
    """Drive skewed, drifting traffic at a running fleet and show, live, what the fleet measured and did."""
    import asyncio

    from moefleet.demo import run_demo

    address, state = _address(args)
    if args.duration <= 0 or args.shift <= 0 or args.concurrency < 1 or args.tokens < 1:
        raise SystemExit("moe-fleet: --duration and --shift must be > 0 seconds, --concurrency and --tokens >= 1")
    checkpoint = args.checkpoint or (state or {}).get("checkpoint")
    snapshot, _ = _snapshot_source(args)
    return asyncio.run(run_demo(address, checkpoint, snapshot, duration_s=args.duration, concurrency=args.concurrency,
                                tokens=args.tokens, shift_s=args.shift, client_kwargs=_client_kwargs(args, state)))


def cmd_deploy(args) -> int:
    """Start the fleet on an existing Ray cluster: check its resources, deploy the Serve config, wait until it serves."""
    import yaml

    from moefleet.deploy import DeployError, deploy
    from moefleet.deploy_config import ServeConfigError, serve_config

    if args.workers < 1 or args.worker_cpus < 0 or args.timeout <= 0:
        raise SystemExit("moe-fleet: --workers must be >= 1, --worker-cpus >= 0 and --timeout > 0 seconds")
    app_args: dict = {"num_workers": args.workers}
    for key in ("checkpoint", "redis_url", "namespace"):
        if getattr(args, key):
            app_args[key] = getattr(args, key)
    if args.worker_cpus != 1.0:
        app_args["worker"] = {"num_cpus": args.worker_cpus}
    router = {k: getattr(args, k) for k in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file") if getattr(args, k)}
    if router:
        app_args["router"] = router  # paths on the head node
    controller = None
    if not args.static:
        controller = {}
        if args.controller_config:
            from pathlib import Path

            try:
                controller = yaml.safe_load(Path(args.controller_config).read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise SystemExit(f"moe-fleet: --controller-config {args.controller_config}: {e}") from None
            if not isinstance(controller, dict):
                raise SystemExit(f"moe-fleet: --controller-config {args.controller_config}: expected a mapping of "
                                 "ControllerConfig fields")
        controller.update(http_host=args.http_host, http_port=args.http_port)
    try:
        config = serve_config(app_args, grpc_port=args.grpc_port, controller=controller, host=args.host,
                              http_port=args.serve_http_port)
    except ServeConfigError as e:
        raise SystemExit(f"moe-fleet: {e}") from None
    if args.dry_run:
        sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
        return 0
    try:
        outcome = deploy(args.address, config, timeout_s=args.timeout, check_resources=not args.skip_resource_check,
                         progress=lambda line: print(line, flush=True))
    except DeployError as e:
        print(f"moe-fleet: {e}", file=sys.stderr)
        return 1
    if not outcome.ok:
        print("moe-fleet: " + "\n".join(outcome.lines), file=sys.stderr)
        return 1
    tls = " (TLS)" if args.tls_cert else ""
    print(f"fleet RUNNING in {outcome.elapsed_s:.0f}s: gRPC on {args.host}:{args.grpc_port}{tls}, {args.workers} workers, "
          + (f"controller on, telemetry http://{args.http_host}:{args.http_port} on the head "
             f"(moe-fleet status --url http://{args.http_host}:{args.http_port})" if controller is not None
             else "controller off (--static)"))
    return 0


def _client_flags(p) -> None:
    p.add_argument("--tls-ca", help="PEM CA bundle that signed the router's certificate (TLS)")
    p.add_argument("--tls-cert", help="client certificate for mutual TLS")
    p.add_argument("--tls-key", help="client key for mutual TLS")


class _PlanArgError(ValueError):
    """A ``moe-fleet plan`` flag with a bad value; the message names it."""


def _plan_inputs(args):
    """(trace, devices builder, fleet entries, expert shape, SimConfig) from ``moe-fleet plan``'s flags."""
    from pathlib import Path

    import yaml

    from moefleet.controller.main import ControllerConfig
    import math

    from moefleet.controller.sim import (
        MODEL_SHAPES,
        ExpertShape,
        SimConfig,
        balanced_capacity,
        fleet_devices,
        parse_diurnal,
        parse_fleet,
        parse_traffic,
    )
    from moefleet.core.expert_stats import counts_to_trace, load_expert_counts
    from moefleet.core.trace import read_trace

    entries = parse_fleet(args.fleet)
    if args.model not in MODEL_SHAPES:
        raise _PlanArgError(f"model: unknown {args.model!r} (known: {', '.join(MODEL_SHAPES)})")
    shape, _, model_top_k = MODEL_SHAPES[args.model]
    if args.hidden or args.intermediate:
        if not (args.hidden and args.intermediate) or args.hidden <= 0 or args.intermediate <= 0:
            raise _PlanArgError("hidden, intermediate: give both, each > 0")
        shape = ExpertShape(args.hidden, args.intermediate, moe_layers=args.moe_layers or shape.moe_layers)
    elif args.moe_layers:
        shape = ExpertShape(shape.hidden, shape.intermediate, shape.gated, shape.dtype_bytes, args.moe_layers)
    if not 0 < args.efficiency <= 1:
        raise _PlanArgError(f"efficiency: must be in (0, 1], got {args.efficiency}")
    if args.target_p99 is not None and not args.target_p99 > 0:
        raise _PlanArgError(f"target-p99: must be > 0 ms, got {args.target_p99}")
    if args.top_k is not None and args.top_k < 1:
        raise _PlanArgError(f"top-k: must be >= 1, got {args.top_k}")
    controller = ControllerConfig(ray_address=None)
    if args.config:
        try:
            raw = yaml.safe_load(Path(args.config).read_text()) or {}
        except OSError as e:
            raise _PlanArgError(f"config: cannot read {args.config}: {e.strerror or e}") from None
        controller = ControllerConfig(**{"ray_address": None, **raw})

    def build(fleet_entries, layers):
        return fleet_devices(fleet_entries, shape, simulated_layers=layers, efficiency=args.efficiency,
                             remote_activations=not args.local_activations, planner_speed=args.planner_speed)

    text = args.trace
    diurnal = None
    if text.startswith("diurnal:"):
        diurnal, text = parse_diurnal(text)
    if text.startswith(("zipf", "drift")):
        synthetic = parse_traffic(text)
        top_k = synthetic.top_k
        if synthetic.load is not None:
            if args.target_p99 is not None:
                raise _PlanArgError("trace: with --target-p99 the traffic must not depend on the fleet: give rate=TOKENS_PER_S, not load=")
            capacity = balanced_capacity(build(entries, synthetic.layers), top_k, synthetic.layers)
            synthetic = synthetic.with_rate(synthetic.load * capacity)
        trace = synthetic.trace()
    else:
        path = Path(text)
        if path.suffix in (".pt", ".pth", ".json"):
            trace = counts_to_trace(load_expert_counts(path), period_s=args.period)
        else:
            trace = read_trace(path)
        top_k = args.top_k or model_top_k
    if diurnal is not None:
        trace = diurnal.apply(trace)
    if args.top_k is not None:
        top_k = args.top_k
    if args.load_scale is None or not args.load_scale > 0 or not math.isfinite(args.load_scale):
        raise _PlanArgError(f"load-scale: must be > 0, got {args.load_scale}")
    if args.history_s is not None and not args.history_s > 0:
        raise _PlanArgError(f"history-s: must be > 0 seconds, got {args.history_s}")
    if args.slo_p99 is not None and not args.slo_p99 > 0:
        raise _PlanArgError(f"slo-p99: must be > 0 ms, got {args.slo_p99}")
    if args.router_call_ms < 0:
        raise _PlanArgError(f"router-call-ms: must be >= 0, got {args.router_call_ms}")
    config = SimConfig(controller=controller, mode=args.mode, concurrency=args.concurrency, top_k=top_k,
                       load_scale=args.load_scale, router_call_s=args.router_call_ms / 1000,
                       weight_source=args.load_from)
    return trace, (lambda fleet_entries: build(fleet_entries, len(trace.layers))), entries, shape, config


def cmd_plan(args) -> int:
    """Simulate elastic placement against a baseline on a routing trace and a fleet (``moefleet.controller.sim``)."""
    import json

    from moefleet.controller.planner import PlanningError
    from moefleet.controller.sim import FleetError, compare_strategies, format_fleet, search_fleet
    from moefleet.core.trace import TraceError

    try:
        trace, build, entries, shape, config = _plan_inputs(args)
        history_s = args.history_s or 30.0
        found = None
        fleet = entries
        if args.target_p99 is not None:
            found = search_fleet(trace, entries, build, args.target_p99, expert_bytes=shape.weight_bytes, config=config)
            fleet = found.best if found.met else None
        results = slo = None
        if fleet is not None:
            devices = build(fleet)
            results = compare_strategies(trace, devices, expert_bytes=shape.weight_bytes, config=config,
                                         baseline=args.baseline, history_s=history_s)
            if args.slo_p99 is not None:
                slo = _slo_figures(trace, devices, shape, config, results, args, history_s)
    except (FleetError, TraceError, _PlanArgError) as e:
        print(f"moe-fleet: {e}", file=sys.stderr)
        return 2
    except PlanningError as e:
        print(f"moe-fleet: fleet: {e} (the fleet cannot hold every expert once)", file=sys.stderr)
        return 2
    if args.json:
        out: dict = {"baseline": args.baseline, "history_s": history_s}
        if found is not None:
            out.update({"target_p99_ms": args.target_p99, "met": found.met,
                        "fleet": format_fleet(found.best) if found.met else None,
                        "candidates": [c.__dict__ for c in found.candidates]})
        if results is not None:
            out.update({k: r.summary() for k, r in results.items()})
            if slo is not None:
                out["slo_p99_ms"] = args.slo_p99
                for k, figures in slo.items():
                    out[k].update(figures)
        print(json.dumps(out, indent=2))
        return 0 if found is None or found.met else 1
    _print_plan(args, trace, config, results, found, slo)
    return 0 if found is None or found.met else 1


def _trace_rate(trace, config) -> float:
    """The trace's model tokens per second at its own volume (times ``--load-scale``)."""
    rows = float(trace.counts.sum()) * config.load_scale
    return rows / (config.top_k * len(trace.layers)) / max(trace.duration_s, 1e-9)


def _slo_figures(trace, devices, shape, config, results, args, history_s) -> dict:
    """Per strategy: capacity at the SLO (highest load scale meeting p99 <= --slo-p99, times the trace's rate) and the
    fraction of windows meeting it at the trace's own volume."""
    from moefleet.controller.sim import after_history, baseline_placement, capacity_at_slo, simulate, slo_met_fraction

    initial = baseline_placement("history", trace, devices, shape.weight_bytes, config, history_s)
    static = baseline_placement(args.baseline, trace, devices, shape.weight_bytes, config, history_s)
    trace = after_history(trace, history_s)
    rate = _trace_rate(trace, config)
    out = {}
    for name, start, elastic in (("elastic", initial, True), ("static", static, False)):
        def run(scale, start=start, elastic=elastic):
            scaled = config.model_copy(update={"load_scale": config.load_scale * scale})
            return simulate(trace, devices, expert_bytes=shape.weight_bytes, config=scaled, elastic=elastic, initial=start)

        cap = capacity_at_slo(run, rate, args.slo_p99)
        out[name] = {"capacity_tokens_per_s": cap["capacity_tokens_per_s"], "capacity_load_scale": cap["scale"],
                     "slo_met_fraction": slo_met_fraction(results[name], args.slo_p99)}
    return out


def _print_plan(args, trace, config, results, found, slo=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from moefleet.controller.sim import format_fleet

    console = Console()
    console.print(f"trace: {len(trace):,} calls over {trace.duration_s:.1f} s, layers {trace.layers}, "
                  f"{trace.num_experts} experts, top-{config.top_k}; mode {config.mode}; model {args.model}")
    if found is not None:
        table = Table("fleet", "devices", "elastic p99 queueing (ms)", "meets", title=f"search: p99 <= {args.target_p99:g} ms")
        for c in found.candidates:
            table.add_row(c.fleet, str(c.devices), "-" if c.p99_ms is None else f"{c.p99_ms:,.1f}",
                          "yes" if c.met else "no", )
        console.print(table)
        if not found.met:
            console.print(f"[bold]not met[/bold]: even {args.fleet} misses p99 <= {args.target_p99:g} ms")
            return
        console.print(f"[bold]smallest fleet meeting it: {format_fleet(found.best)}[/bold]")
    e, s = results["elastic"], results["static"]
    history = args.history_s or 30.0
    baseline = {"first": "static: first plan", "history": f"static: plan on first {history:g} s",
                "eplb": f"EPLB on first {history:g} s"}[args.baseline]
    title = f"fleet {args.fleet if found is None else format_fleet(found.best)}; tokens/s at the trace's volume"
    if slo is not None:
        title += f"; SLO: p99 latency <= {args.slo_p99:g} ms"
    table = Table("", "elastic", baseline, "elastic / baseline", title=title)
    rows = [
        ("tokens/s", e.tokens_per_s, s.tokens_per_s, "{:,.0f}"),
        ("max/mean busy time", e.max_over_mean, s.max_over_mean, "{:.2f}"),
        ("p99 queueing (ms)", e.p99_ms, s.p99_ms, "{:,.1f}"),
        ("p99 latency (ms)", e.p99_latency_ms, s.p99_latency_ms, "{:,.1f}"),
        ("bytes moved", e.bytes_moved, s.bytes_moved, "{:,.0f}"),
        ("device-hours", e.device_hours, s.device_hours, "{:,.3f}"),
        ("plans applied/skipped", f"{e.plans_applied} / {e.plans_skipped}", f"{s.plans_applied} / -", None),
    ]
    if slo is not None:
        rows += [
            ("capacity at SLO", slo["elastic"]["capacity_tokens_per_s"], slo["static"]["capacity_tokens_per_s"],
             "{:,.0f}"),
            ("windows meeting SLO", slo["elastic"]["slo_met_fraction"] or 0.0, slo["static"]["slo_met_fraction"] or 0.0,
             "{:.1%}"),
        ]
    for name, a, b, fmt in rows:
        if fmt is None:
            table.add_row(name, a, b, "")
        else:
            table.add_row(name, fmt.format(a), fmt.format(b), f"{a / b:.2f}" if b else "-")
    console.print(table)


ROUTER_CALL_MS = 1.6
"""``moe-fleet plan``'s default router time per layer call: the embedded router's call overhead at one token, 1.63 ms
mean on a 2-core CPU machine (gate, dispatch, compiled-graph round trip, combine: ``benchmarks/bench_hot_path.py``,
RESULTS.md "The per-layer hot path"). A GPU router's is smaller; pass ``--router-call-ms`` for another fleet."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-fleet", description="Elastic expert serving for MoE models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "inspect", help="show the family, quantization, MoE spec and memory of a checkpoint (or the built-in default model)"
    )
    p.add_argument("--checkpoint", help="Hugging Face-format checkpoint directory (default: built-in model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype of float experts (default: the checkpoint's)")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("demo-local", help="run the model's MoE layers in process on skewed traffic")
    p.add_argument("--checkpoint", help="Hugging Face-format checkpoint directory (default: built-in model)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per layer call")
    p.add_argument("--skew", type=float, default=1.0, help="how strongly tokens lean towards the hot experts")
    p.set_defaults(fn=cmd_demo_local)
    p = sub.add_parser("up", help="start a local single-machine fleet (Ray on loopback, Redis, workers, router)")
    p.add_argument("--checkpoint", help="Hugging Face-format checkpoint directory (default: built-in model)")
    p.add_argument("--workers", type=int, default=2, help="ExpertGroup workers")
    p.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs per worker")
    p.add_argument("--port", type=int, default=50051, help="gRPC port on 127.0.0.1 (0: any free port)")
    p.add_argument("--redis-url", help="use this Redis instead of starting one")
    p.add_argument("--static", action="store_true", help="no controller: keep the starting placement, repair nothing")
    p.add_argument("--min-replicas", type=_min_replicas, default="auto",
                   help="replicas every expert keeps when memory allows (2: a worker's death loses no request); "
                   "'auto' (default): 2 where the devices' memory holds two copies of every expert, else 1")
    p.add_argument("--http-port", type=int, default=None,
                   help="telemetry endpoint on 127.0.0.1 (dashboard /, /metrics, /api/state); default 8470 "
                   "or $MOEFLEET_HTTP_PORT, 0: any free port, -1: none")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground until interrupted")
    p.add_argument("--auth-token-file", help="require this bearer token on every RPC (default: $MOEFLEET_AUTH_TOKEN if set)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve gRPC over TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates it signed (mutual TLS)")
    p.add_argument("--emulate", metavar="TYPE:COUNT,...",
                   help="emulated devices instead of --workers, e.g. h100:16,l4:16: real workers computing on the CPU, "
                   "owning no cores, each taking its device type's modelled time per call and holding its memory")
    p.add_argument("--emulate-slowdown", type=float, default=1.0,
                   help="emulated devices take this many times their modelled time (time dilation; default 1)")
    p.add_argument("--emulate-model", help="time and size emulated devices for this model's experts "
                   "(deepseek-v3, mixtral-8x7b, qwen2-57b-a14b; default the checkpoint's own)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the fleet to come up")
    p.set_defaults(fn=cmd_up)
    p = sub.add_parser("down", help="stop the local fleet")
    p.add_argument("--timeout", type=float, default=60)
    p.set_defaults(fn=cmd_down)
    p = sub.add_parser("status", help="what the fleet measured: layers, hottest experts, devices, rebalances, events")
    p.add_argument("--url", help="a fleet's telemetry endpoint, e.g. http://HOST:8470 (default: the local fleet's)")
    p.add_argument("--redis-url", help="read the fleet's store directly instead (with --namespace)")
    p.add_argument("--namespace", default="moefleet", help="the fleet's namespace in that store")
    p.add_argument("--json", action="store_true", help="print the snapshot as JSON (with --watch: one a line)")
    p.add_argument("--watch", action="store_true", help="refresh every --interval seconds until interrupted")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    p.add_argument("--count", type=int, default=None, help="with --watch: stop after this many snapshots")
    p.add_argument("--all-layers", action="store_true", help="one row per layer even past 16 (default: the least balanced)")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("trace", help="routing traces: record from a fleet, replay through the planner, import SGLang/vLLM dumps")
    tsub = p.add_subparsers(dest="trace_command", required=True)
    t = tsub.add_parser("record", help="record the fleet's per-expert routing into a JSONL trace")
    t.add_argument("--out", required=True, help="JSONL file to write: one line per (window, layer)")
    t.add_argument("--duration", type=float, required=True, help="seconds to record")
    t.add_argument("--window", type=float, default=1.0, help="load window width the routers use (RouterConfig.load_window_s)")
    t.add_argument("--settle", type=float, default=2.0, help="seconds after a window ends before it is read (router flushes)")
    t.add_argument("--redis-url", help="the fleet's store (default: the local fleet's)")
    t.add_argument("--namespace", default="moefleet", help="the fleet's namespace in that store")
    t.set_defaults(fn=cmd_trace_record)
    t = tsub.add_parser("replay", help="run the planner over a trace (or an SGLang/vLLM dump); print moves, bytes, balancedness")
    t.add_argument("file", help="JSONL trace, or an SGLang/vLLM expert-count dump (.pt or .json)")
    t.add_argument("--devices", type=int, default=2, help="devices to place on")
    t.add_argument("--memory-gib", type=float, default=None, help="memory per device (default: room for every expert twice)")
    t.add_argument("--checkpoint", help="model the trace is of, for expert sizes (default: built-in model)")
    t.add_argument("--expert-bytes", type=float, default=None, help="bytes of one expert's weights (instead of --checkpoint)")
    t.add_argument("--window", type=float, default=None, help="window width in seconds (default: read from the trace)")
    t.add_argument("--min-gain", type=float, default=0.05, help="the planner's min_gain (local mode's default)")
    t.add_argument("--min-replicas", type=_min_replicas, default="auto",
                   help="replicas every expert keeps when memory allows ('auto', the default: 2 where it holds two copies)")
    t.add_argument("--config", help="a controller.yaml (ControllerConfig) to decide with instead of local mode's settings")
    t.add_argument("--json", action="store_true", help="print every window's decision and load as JSON")
    t.set_defaults(fn=cmd_trace_replay)
    t = tsub.add_parser("import", help="convert an SGLang/vLLM expert-distribution dump into a JSONL trace")
    t.add_argument("dump", help=".pt or .json file with [layers, experts] (or [steps, layers, experts]) counts")
    t.add_argument("--out", required=True, help="JSONL trace to write")
    t.add_argument("--period", type=float, default=1.0, help="seconds between the dump's snapshots")
    t.add_argument("--layers", help="comma-separated model layer numbers of the dump's rows (default 0..L-1)")
    t.set_defaults(fn=cmd_trace_import)
    p = sub.add_parser("demo", help="drive skewed traffic whose hot experts shift; watch the fleet measure and rebalance")
    p.add_argument("--address", help="router address (default: the local fleet)")
    p.add_argument("--url", help="the fleet's telemetry endpoint (default: the local fleet's)")
    p.add_argument("--redis-url", help="read the fleet's store directly instead (with --namespace)")
    p.add_argument("--namespace", default="moefleet", help="the fleet's namespace in that store")
    p.add_argument("--checkpoint", help="checkpoint the fleet serves (default: the local fleet's)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of traffic")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--shift", type=float, default=10.0, help="seconds between shifts of the hot experts")
    _client_flags(p)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("deploy", help="start the fleet and its controller on an existing Ray cluster (Serve applications)")
    p.add_argument("--address", default="http://127.0.0.1:8265", help="the cluster's dashboard address")
    p.add_argument("--checkpoint", help="checkpoint directory present on every node (default: built-in model)")
    p.add_argument("--workers", type=int, default=2, help="workers of the starting placement")
    p.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs each worker reserves (also its torch threads)")
    p.add_argument("--namespace", help="Ray namespace and Redis key prefix of the fleet (default: moefleet)")
    p.add_argument("--redis-url", help="Redis URL (default: MOEFLEET_REDIS_URL on the cluster)")
    p.add_argument("--tls-cert", help="on the head: PEM certificate of the gRPC port (TLS)")
    p.add_argument("--tls-key", help="on the head: its PEM key")
    p.add_argument("--tls-client-ca", help="on the head: CA bundle of the client certificates to require (mutual TLS)")
    p.add_argument("--auth-token-file", help="on the head: the API's bearer token (default: MOEFLEET_AUTH_TOKEN on the head)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the gRPC port and Serve's HTTP proxy bind on the head (default loopback; 0.0.0.0 serves "
                        "clients on other machines, and then needs a token)")
    p.add_argument("--grpc-port", type=int, default=9000, help="the fleet's gRPC port")
    p.add_argument("--serve-http-port", type=int, default=8000, help="Serve's HTTP proxy port (health checks)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--controller", dest="static", action="store_false", default=False,
                       help="start the controller beside the fleet (the default)")
    group.add_argument("--static", dest="static", action="store_true",
                       help="no controller: keep the starting placement, repair nothing")
    p.add_argument("--controller-config", help="YAML ControllerConfig with the controller's knobs (checkpoint, namespace "
                                               "and worker are the fleet's)")
    p.add_argument("--http-host", default="127.0.0.1", help="address the controller's telemetry endpoint binds on the head")
    p.add_argument("--http-port", type=int, default=8470, help="the telemetry endpoint's port (/metrics, dashboard, /api/state)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the fleet to serve before reporting why not")
    p.add_argument("--skip-resource-check", action="store_true",
                   help="deploy even when the live nodes lack the resources (a cluster whose autoscaler adds nodes)")
    p.add_argument("--dry-run", action="store_true", help="print the Serve config instead of deploying it")
    p.set_defaults(fn=cmd_deploy)
    p = sub.add_parser(
        "plan", help="simulate elastic placement against EPLB (or another baseline) on a routing trace and a fleet (no Ray)",
        description="Replay a routing trace on a simulated fleet, re-planned by the real controller's decisions "
                    "(elastic) or kept on a baseline planned once on the trace's first --history-s seconds (static: "
                    "EPLB by default). See controller/sim/engine.py for the model.",
    )
    p.add_argument("--trace", required=True,
                   help="JSONL routing trace ({t, layer, counts} a line); an SGLang/vLLM expert-count dump (.pt, .pth, "
                        ".json); synthetic 'zipf:s=1.2,experts=64,layers=4,top_k=2,duration=120,shift=15,tokens=4096,load=1.25' "
                        "or 'drift:experts=64,layers=4,duration=600,...' (popularity on a log-AR(1) walk under a drifting "
                        "mix of workloads); any of them behind 'diurnal:ratio=5,period=600:' scales its volume by a "
                        "daily curve")
    p.add_argument("--fleet", required=True, help="device types and counts, e.g. h100:16,l4:16 (TYPE:COUNT[:field=value])")
    p.add_argument("--json", action="store_true", help="print {baseline, elastic: {...}, static: {...}} as JSON")
    p.add_argument("--target-p99", type=float, metavar="MS",
                   help="search the smallest fleet mix (at most --fleet's counts) whose elastic p99 queueing delay is <= MS")
    p.add_argument("--model", default="deepseek-v3", help="expert shape: deepseek-v3, mixtral-8x7b, qwen2-57b-a14b")
    p.add_argument("--hidden", type=int, help="expert hidden size H (with --intermediate: overrides --model's shape)")
    p.add_argument("--intermediate", type=int, help="expert intermediate size F")
    p.add_argument("--moe-layers", type=int, help="MoE layers of the whole model (device memory is shared by all of them)")
    p.add_argument("--top-k", type=int, help="experts per token (default: zipf's top_k, else the model's)")
    p.add_argument("--period", type=float, default=1.0, help="seconds between snapshots of an expert-count dump")
    p.add_argument("--mode", choices=["open", "closed"], default="open",
                   help="open: calls arrive at the trace's times; closed: --concurrency clients back to back")
    p.add_argument("--concurrency", type=int, default=8, help="clients in closed mode")
    p.add_argument("--load-scale", type=float, default=1.0,
                   help="multiply every count of the trace (the volume every figure but the capacity is taken at)")
    p.add_argument("--baseline", choices=["first", "history", "eplb"], default="eplb",
                   help="what elastic is compared with, planned once and kept: 'eplb' (default) DeepSeek EPLB on the "
                        "first --history-s seconds with the slots elastic's memory allows; 'history' the planner on "
                        "the same seconds; 'first' the planner's first plan (its first interval)")
    p.add_argument("--history-s", type=float, default=None, metavar="S",
                   help="seconds of the trace's start the baselines (and elastic's first plan) are planned on; the "
                        "strategies are measured on the rest of the trace (default 30)")
    p.add_argument("--slo-p99", type=float, metavar="MS",
                   help="add each strategy's capacity: the highest sustainable tokens/s with p99 call latency <= MS "
                        "(capacity_tokens_per_s), and the fraction of windows meeting it (slo_met_fraction)")
    p.add_argument("--efficiency", type=float, default=0.5, help="fraction of the tensor-core peak an expert GEMM reaches")
    p.add_argument("--planner-speed", choices=["measured", "spec"], default="measured",
                   help="device speed the planner sees: as measured under the model (default) or the spec-sheet ratio")
    p.add_argument("--local-activations", action="store_true",
                   help="every device on the router's node (no activation transfer); default: devices on other nodes get "
                        "their tokens' rows over their network link, as the product sends them")
    p.add_argument("--router-call-ms", type=float, default=ROUTER_CALL_MS,
                   help=f"the router's own time per layer call (gate, dispatch, transport, combine; default {ROUTER_CALL_MS} ms)")
    p.add_argument("--load-from", choices=["checkpoint", "peer"], default="checkpoint",
                   help="where added replicas' weights come from: the checkpoint (what the reconciler does) or a peer")
    p.add_argument("--config", help="YAML ControllerConfig with the controller's knobs (interval_s, planner, autoscaling, ...)")
    p.set_defaults(fn=cmd_plan)
    args = parser.parse_args(argv)
    if getattr(args, "http_port", 0) is None:
        from moefleet.core.config import default_http_port

        try:
            args.http_port = default_http_port()
        except ValueError as e:
            print(f"moe-fleet: {e}: unset it or pass --http-port", file=sys.stderr)
            return 2
    from moefleet.core.state import StateStoreError
    from moefleet.core.trace import TraceError

    try:
        return args.fn(args)
    except CheckpointError as e:
        print(f"moe-fleet: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"moe-fleet: invalid setting: {e}", file=sys.stderr)
        return 2
    except TraceError as e:
        print(f"moe-fleet: bad trace: {e}", file=sys.stderr)
        return 2
    except StateStoreError as e:
        print(f"moe-fleet: {e}: is the fleet up? ('moe-fleet up' starts one; --redis-url names another store)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
