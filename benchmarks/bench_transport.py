"""How should a layer call's tensors travel between the router and its workers? Measured on this machine.

    python benchmarks/bench_transport.py [--sizes-mb 1 16] [--repeats 10] [--out FILE]

One "router" actor sends hidden states [T, H] (fp32) to a "worker" actor that
reads every byte and returns a partial output of the same size, as the fleet's
transport does. Variants:

- ``arg``: the numpy array as a plain call argument (Ray copies it into the object store).
- ``put_ref``: ``ray.put`` once, pass the ``ObjectRef`` (the fleet's choice; one put serves every worker).
- ``torch_arg``: a torch tensor as the argument (pickled).
- ``rdt_gloo``: Ray Direct Transport: the router actor's tensor goes to the worker over gloo
  (``@ray.method(tensor_transport="gloo")``); the output returns through the object store.

Each variant's time includes the worker reading the input and the router
receiving the output.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_rdt_fetch_fail_timeout_milliseconds", "15000")  # a hung transfer fails in 15 s, not 60

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentiles, single, write_json, write_result  # noqa: E402


@ray.remote(num_cpus=0.5)
class Worker:
    def consume_np(self, x: np.ndarray) -> np.ndarray:
        return x * 2.0

    def consume_torch(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0

    def consume_rdt(self, x: torch.Tensor) -> np.ndarray:
        """Input arrives over RDT (gloo); the partial output returns through the object store."""
        return (x * 2.0).numpy()


@ray.remote(num_cpus=0.5)
class Router:
    def __init__(self, worker):
        self.worker = worker

    @ray.method(tensor_transport="gloo")
    def make(self, n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.float32)

    def run(self, variant: str, nbytes: int, repeats: int) -> list[float]:
        n = nbytes // 4
        x_np = np.ones(n, dtype=np.float32)
        x_t = torch.ones(n, dtype=torch.float32)
        out = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            if variant == "arg":
                y = ray.get(self.worker.consume_np.remote(x_np))
            elif variant == "put_ref":
                y = ray.get(self.worker.consume_np.remote(ray.put(x_np)))
            elif variant == "torch_arg":
                y = ray.get(self.worker.consume_torch.remote(x_t))
            else:
                raise ValueError(variant)
            assert float(y[0]) == 2.0
            if i:
                out.append(time.perf_counter() - t0)
        return out


def rdt(router, worker, nbytes: int, repeats: int) -> list[float]:
    """Tensor made by the router actor, consumed by the worker, result fetched: all over gloo where RDT allows."""
    out = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        ref = router.make.remote(nbytes // 4)
        y = ray.get(worker.consume_rdt.remote(ref))
        assert float(y[0]) == 2.0
        if i:
            out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    worker = Worker.remote()
    router = Router.remote(worker)
    results = {}
    rdt_error = None
    try:
        from ray.experimental.collective import create_collective_group

        create_collective_group([router, worker], backend="gloo")
    except Exception as e:  # reported, and the variant is left out
        rdt_error = f"{type(e).__name__}: {e}"
    for mb in args.sizes_mb:
        nbytes = int(mb * (1 << 20))
        for variant in ("arg", "put_ref", "torch_arg"):
            results[f"{variant}_{mb:g}MB"] = percentiles(ray.get(router.run.remote(variant, nbytes, args.repeats)))
    for mb in args.sizes_mb:  # last: a failed RDT transfer kills both actors
        if rdt_error is None:
            try:
                results[f"rdt_gloo_{mb:g}MB"] = percentiles(rdt(router, worker, int(mb * (1 << 20)), args.repeats))
            except Exception as e:
                rdt_error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    print(f"{'variant':22s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for k, v in results.items():
        print(f"{k:22s} {v['p50_ms']:8.2f} {v['p99_ms']:8.2f}")
    if rdt_error:
        print(f"rdt_gloo not measured: {rdt_error}")
    write_json("transport", {"results": results, "rdt_error": rdt_error}, args.out)
    figures = {}
    for k, v in results.items():
        figures[f"{k} p50"] = single(v["p50_ms"], "ms", f"median of {v['n']} round trips")
        figures[f"{k} p99"] = single(v["p99_ms"], "ms")
    write_result("transport", title="Tensor transport between router and workers",
                 question="How fast does an array travel from a router actor to a worker actor and back?",
                 command="python benchmarks/bench_transport.py", figures=figures,
                 details={"results": results, "rdt_error": rdt_error})
    ray.shutdown()


if __name__ == "__main__":
    main()
