"""``attach(hf_model, client)``: serve a ``transformers`` model's MoE blocks from the fleet.

Every MoE block is replaced by ``RemoteMoEBlock``, a ``torch.nn.Module`` that
sends the block's input to the router and returns the fleet's output, so
``model(...)`` and ``model.generate(...)`` work unchanged.
"""

from __future__ import annotations

import torch

from moefleet.core.families import family_for


class RemoteMoEBlock(torch.nn.Module):
    """Stands in for one MoE block: ``hidden [..., H] -> [..., H]`` computed by the fleet.

    per_sequence: send each sequence of a batch as its own call (capacity routing
    counted per sequence, as Switch Transformers does).
    returns_tuple: return ``(output, None)`` where the replaced block returns a
    pair (Llama 4, gpt-oss return their router's output beside the hidden states).
    """

    def __init__(self, client, layer: int, per_sequence: bool = False, returns_tuple: bool = False):
        super().__init__()
        self.client = client
        self.layer = layer
        self.per_sequence = per_sequence
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        shape = hidden_states.shape
        if self.per_sequence and hidden_states.dim() == 3:
            outs = [self.client.forward(self.layer, row) for row in hidden_states]
            out = torch.stack(outs).to(hidden_states.dtype)
        else:
            flat = hidden_states.reshape(-1, shape[-1])
            out = self.client.forward(self.layer, flat).reshape(shape).to(hidden_states.dtype)
        return (out, None) if self.returns_tuple else out


def _resolve(model: torch.nn.Module, path: str):
    parts = path.split(".")
    for start in range(len(parts)):  # tolerate a base model passed instead of the *ForCausalLM wrapper
        obj = model
        try:
            for p in parts[start:-1]:
                obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
            getattr(obj, parts[-1])
            return obj, parts[-1]
        except (AttributeError, IndexError, TypeError):
            continue
    raise ValueError(f"model has no module at {path!r}: is it the checkpoint the fleet serves?")


def attach(hf_model: torch.nn.Module, client) -> list[int]:
    """Replace every MoE block of ``hf_model`` with a ``RemoteMoEBlock``; returns the layers replaced."""
    cfg = hf_model.config.to_dict()
    family = family_for(cfg)
    spec = family.spec(cfg)
    per_sequence = family.name == "switch_transformers"
    for layer in spec.moe_layers:
        parent, name = _resolve(hf_model, family.block_path(layer, spec))
        setattr(parent, name, RemoteMoEBlock(client, layer, per_sequence, family.block_returns_tuple))
    return list(spec.moe_layers)
