"""What every router host runs beside the serving path: placement following, heartbeats, telemetry.

Both router hosts — the grpc.aio router actor (``actor.py``) and the Ray Serve
ingress (``serve_app.py``) — own a ``RouterCore`` and one ``RouterRuntime``
around it, which

* follows the placement table in Redis (generation-aware: a table that was
  reset is followed from its first version);
* heartbeats ``router:<id>`` every ``HEARTBEAT_INTERVAL_S`` with the placement
  version (and generation) it serves and the oldest (generation, version) a
  dispatched call still uses — the reconciler unloads an old replica only when
  every router reports past it — and its Ray actor id, so that a router whose
  heartbeats stopped while its process lives (cut off from the store) still
  holds up the drains;
* flushes token counts per (layer, expert) to the load windows every
  ``telemetry_interval_s``, keeping the counts for the next flush when Redis
  is unreachable.

Redis being down never stops serving: the router keeps its cached placement
and retries; heartbeats and telemetry resume when Redis answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

from moefleet.core.state import StateStore

from .router import RouterCore

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.1
HEARTBEAT_TTL_S = 3.0


class RouterRuntime:
    """Placement watch, heartbeat and telemetry of one router (see the module docstring)."""

    def __init__(self, core: RouterCore, store: StateStore, router_id: str, kind: str = "router", info: dict[str, Any] | None = None):
        self.core = core
        self.store = store
        self.router_id = router_id
        self.kind = kind
        self.info = dict(info or {})
        self.on_placement = None  # optional callback after each switch (e.g. health status)
        self._watch = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store_down = False

    @property
    def key(self) -> str:
        return f"router:{self.router_id}"

    def start(self) -> None:
        """Read the placement, start watching it, start the heartbeat loop (call from the serving event loop)."""
        self._loop = asyncio.get_running_loop()
        try:
            placement = self.store.get_placement()
            if placement is not None:
                self.core.set_placement(placement)
        except Exception as e:  # Redis down at start: serve nothing yet, the watch catches up
            log.warning("router %s: cannot read the placement yet: %s", self.router_id, e)
        held = self.core.placement
        self._watch = self.store.watch_placement(
            lambda p: self._loop.call_soon_threadsafe(self._switch, p), since_version=held.version, generation=held.generation
        )
        self._task = asyncio.create_task(self._run())

    def _switch(self, placement) -> None:
        self.core.set_placement(placement)
        if self.on_placement is not None:
            self.on_placement(placement)
        asyncio.ensure_future(self.heartbeat())

    def heartbeat_info(self) -> dict[str, Any]:
        core = self.core
        oldest = core.oldest_inflight()
        return {
            "kind": self.kind,
            **self.info,
            "actor_id": _actor_id(),
            "placement_version": core.placement.version,
            "placement_generation": core.placement.generation,
            "oldest_inflight": list(oldest),
            "oldest_inflight_version": oldest[1],
            "stats": dict(core.stats.__dict__),
            "transport": core.transport_report(),
            "call_overhead": core.stages.totals().get("call_overhead"),
            "call_overhead_buckets": core.stages.cumulative("call_overhead") if core.stages.totals().get("call_overhead") else None,
            "model": self.model_facts(),
        }

    def model_facts(self) -> dict[str, Any]:
        """What the fleet serves, for tools that read only the store (telemetry, status)."""
        spec = self.core.spec
        return {"family": spec.family, "moe_layers": list(spec.moe_layers), "num_experts": spec.layer.num_experts,
                "top_k": spec.layer.top_k}

    async def heartbeat(self) -> None:
        info = self.heartbeat_info()
        await asyncio.get_running_loop().run_in_executor(None, self.store.register_worker, self.key, info, None, HEARTBEAT_TTL_S)

    async def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            self.core.transport.tick()  # a broken compiled graph rebuilt, drained old ones torn down
            ok = True
            try:
                await self.heartbeat()
            except Exception as e:
                ok = False
                self._report_down(e)
            if time.monotonic() - last_flush >= self.core.config.telemetry_interval_s:
                last_flush = time.monotonic()
                ok = await self.flush_telemetry() and ok
            if ok and self._store_down:
                self._store_down = False
                log.info("router %s: the store answers again; heartbeats and telemetry resumed", self.router_id)

    def _report_down(self, e: Exception) -> None:
        if not self._store_down:
            log.warning("router %s: the store is unreachable (%s); serving from the cached placement v%d",
                        self.router_id, e, self.core.placement.version)
        self._store_down = True

    async def flush_telemetry(self) -> bool:
        """Send token counts per expert to the load windows; on failure keep them for the next flush."""
        counts = self.core.take_load_counts()
        if not counts:
            return True
        t0 = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.store.record_load(counts, None, self.core.config.load_window_s, self.router_id)
            )
            return True
        except Exception as e:  # telemetry must not stop serving; the counts wait for the next flush
            with self.core._lock:
                merged = defaultdict(int, counts)
                for k, v in self.core.load_counts.items():
                    merged[k] += v
                self.core.load_counts = merged
            self._report_down(e)
            return False
        finally:
            self.core.stats.telemetry_s += time.perf_counter() - t0

    async def stop(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.store.deregister_worker, self.key)
        except Exception as e:  # the record expires by itself
            log.warning("router %s: deregister failed: %s", self.router_id, e)
        if self._watch is not None:
            self._watch.stop()
        if self._task is not None:
            self._task.cancel()


def _actor_id() -> str | None:
    """This process's Ray actor id (hex), None outside an actor."""
    try:
        import ray

        return ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - reporting only
        return None
