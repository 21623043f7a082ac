"""The ``moe-fleet`` command line."""

from __future__ import annotations

import argparse
import sys
import time

from moefleet.core.checkpoint import CheckpointError


def _load(checkpoint: str | None):
    from moefleet import MoEModel

    return MoEModel.from_pretrained(checkpoint) if checkpoint else MoEModel.default()


def cmd_inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    model = _load(args.checkpoint)
    spec = model.spec
    console = Console()
    console.print(f"[bold]{spec.family}[/bold] at {model.checkpoint.path}")
    console.print(f"layers: {spec.num_layers}, MoE layers: {list(spec.moe_layers)}, dtype: {spec.dtype}")
    table = Table("field", "value", title="MoE layer spec")
    for name, value in spec.layer.model_dump().items():
        table.add_row(name, str(value))
    console.print(table)
    return 0


def skewed_hidden(layer, num_tokens: int, hot: list[int], skew: float, generator) -> "torch.Tensor":  # noqa: F821
    """Hidden states [T, H] whose router prefers the ``hot`` experts (ids of layer's gate rows)."""
    import torch

    gate = layer.gate.weight.float()
    h = gate.shape[1]
    x = torch.randn(num_tokens, h, generator=generator)
    pick = torch.randint(0, len(hot), (num_tokens,), generator=generator)
    direction = gate[torch.tensor(hot)[pick]]
    direction = direction / direction.norm(dim=-1, keepdim=True)
    return x + skew * direction * (h**0.5)


def cmd_demo_local(args) -> int:
    """In-process demo: route skewed traffic through each MoE layer of the model and show per-expert load."""
    import torch
    from rich.console import Console
    from rich.table import Table

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
        x = skewed_hidden(layer, args.tokens, hot, args.skew, g)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-fleet", description="Elastic expert serving for MoE models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show the MoE spec read from a checkpoint (or the built-in default model)")
    p.add_argument("--checkpoint", help="Hugging Face-format checkpoint directory (default: built-in model)")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("demo-local", help="run the model's MoE layers in process on skewed traffic")
    p.add_argument("--checkpoint", help="Hugging Face-format checkpoint directory (default: built-in model)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per layer call")
    p.add_argument("--skew", type=float, default=1.0, help="how strongly tokens lean towards the hot experts")
    p.set_defaults(fn=cmd_demo_local)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except CheckpointError as e:
        print(f"moe-fleet: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
