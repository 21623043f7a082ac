"""Host CPU for the fleet simulator: the work besides the workers' that runs on the workers' own cores.

On a GPU fleet the router, the clients and Ray run on host CPUs while the
experts run on GPUs, and the simulator leaves them out. In local mode on a CPU
machine (``moefleet.local``: each worker owns one core) they run on the same
cores as the workers: a router gating and combining, client threads encoding
requests, Ray's raylet moving objects, Redis. When one worker idles (a static
placement with its hot experts on the other), that work takes the idle core
for free; when both are busy, every second of it is a second a worker loses.
That difference is what ``HostCpu`` adds to a run (``SimConfig.host_cpu``):

* each device owns one core (device ``d`` of the run is core ``d``), and
  ``spare_cores`` more belong to no device;
* each layer call first costs ``call_s + worker_call_s x (devices it
  touches) + returned_row_s x (output rows they return)`` of host CPU
  (``devices.returned_rows``), from its arrival, on the core that would finish it
  first (an idle core if there is one); its rows reach the devices when that
  work is done. In a closed loop a call's reply handling and the next
  request's sending are back to back, so one job per call carries both;
* ``background_cores`` of CPU with no traffic at all (Ray's and Redis's own
  loops, heartbeats): a job of ``background_cores x tick_s`` every ``tick_s``;
* ``controller_step_s`` at each controller step (elastic runs only: a static
  fleet has no controller).

A core (``Cores``) runs work in the order it was handed out and lends its
idle time to whatever comes later: work placed at ``t`` fills the core's
gaps from ``t`` on, split around work placed before it. So no core idles
while work waits for it (as with the kernel's scheduler), but a core does not
time-slice: work handed out first finishes first, where the kernel would
share the core between a worker and the router at once. The CPU a worker
loses is the same; single calls' latencies differ.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Cores", "HostCpu"]


class HostCpu(BaseModel):
    """CPU work besides the workers', on the cores the workers own (local mode on a CPU machine)."""

    model_config = ConfigDict(extra="forbid")

    call_s: float = Field(default=0.0, ge=0, description="CPU seconds per layer call: client, gRPC, router gating, dispatch and combine, Ray.")
    worker_call_s: float = Field(default=0.0, ge=0, description="More CPU seconds per worker call (one per device a layer call touches).")
    returned_row_s: float = Field(default=0.0, ge=0, description="More CPU seconds per output row a worker returns (moving and summing it).")
    background_cores: float = Field(default=0.0, ge=0, description="CPU (cores) the host processes use with no traffic.")
    controller_step_s: float = Field(default=0.0, ge=0, description="CPU seconds of one controller step (elastic runs).")
    spare_cores: int = Field(default=0, ge=0, description="Cores no device owns; host work runs there as well.")
    tick_s: float = Field(default=0.05, gt=0, description="Background work comes as one job every tick_s.")

    def call_cpu_s(self, devices_touched: int, returned_rows: int = 0) -> float:
        """Host CPU seconds of one layer call that sends work to ``devices_touched`` devices, which return
        ``returned_rows`` output rows in all."""
        return self.call_s + self.worker_call_s * devices_touched + self.returned_row_s * returned_rows


class Cores:
    """The busy time of ``n`` cores (``first_spare..`` own no device), each as sorted, disjoint intervals.

    ``forget_before(t)`` drops what ended before ``t``: call it with the
    simulator's clock once nothing will be placed before ``t`` any more.
    """

    def __init__(self, n: int, first_spare: int):
        if n < 1:
            raise ValueError(f"n: at least one core, got {n}")
        self.busy: list[list[tuple[float, float]]] = [[] for _ in range(n)]
        self.first_spare = first_spare

    def _gaps(self, core: int, t: float, seconds: float) -> list[tuple[float, float]]:
        """The slices ``seconds`` of work arriving at ``t`` would take on ``core``: its idle time from ``t`` on."""
        out, cur, left = [], t, seconds
        for start, end in self.busy[core]:
            if end <= cur:
                continue
            if start > cur:
                take = min(start - cur, left)
                out.append((cur, cur + take))
                left -= take
                if left <= 0:
                    return out
            cur = max(cur, end)
        out.append((cur, cur + left))
        return out

    def finish(self, core: int, t: float, seconds: float) -> float:
        """When ``seconds`` of work arriving at ``t`` would be done on ``core`` (nothing is placed)."""
        return self._gaps(core, t, seconds)[-1][1]

    def place(self, core: int, t: float, seconds: float) -> list[tuple[float, float]]:
        """Run ``seconds`` of work arriving at ``t`` on ``core``; returns its slices ``[(start, end), ...]`` in order."""
        if seconds < 0:
            raise ValueError(f"seconds: must be >= 0, got {seconds}")
        busy = self.busy[core]
        slices = self._gaps(core, t, seconds)
        merged: list[tuple[float, float]] = []
        for start, end in sorted(busy + [sl for sl in slices if sl[1] > sl[0]]):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        self.busy[core] = merged
        return slices

    def forget_before(self, t: float) -> None:
        """Drop busy intervals that ended by ``t`` (keeps the lists short)."""
        for core, busy in enumerate(self.busy):
            if busy and busy[0][1] <= t:
                self.busy[core] = [iv for iv in busy if iv[1] > t]

    def host_core(self, t: float, seconds: float) -> int:
        """The core that would finish ``seconds`` of work arriving at ``t`` first (ties: spare cores, then the lowest)."""
        return min(range(len(self.busy)), key=lambda c: (self.finish(c, t, seconds), c < self.first_spare, c))
