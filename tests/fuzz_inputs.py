"""Hostile inputs for the router: hypothesis strategies over ``moefleet.v1`` messages and raw byte mutations.

Shared by ``tests/integration/test_fuzz.py`` and ``benchmarks/bench_reliability.py``. Shapes follow
``tests.hf_models.mixtral`` (hidden 32, MoE layers 0 and 1) unless told otherwise.
"""

from __future__ import annotations

import random

import grpc
import numpy as np
import torch
from hypothesis import strategies as st

from moefleet.router_service import codec
from moefleet.router_service.proto import fleet_pb2 as pb

FORWARD_CODES = {  # the statuses fleet.proto documents for Forward, less those a healthy fleet without deadlines never gives
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
}

H, LAYERS = 32, (0, 1)  # hf_models.mixtral: hidden 32, both layers MoE
SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e-30, 65504.0], dtype=np.float32)


def valid_request(layer: int, t: int, seed: int, dtype: int = pb.FLOAT32, routing: bool = False, request_id: str = "") -> pb.ForwardRequest:
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(seed)).to(codec.TORCH_DTYPES[dtype])
    return pb.ForwardRequest(layer=layer, hidden=codec.encode(x), return_routing=routing, request_id=request_id)


@st.composite
def tensors(draw, near: tuple[int, ...] = (H,)):
    dims = st.one_of(st.integers(0, 20), st.sampled_from(near), st.integers(-3, -1), st.integers(2**31 - 2, 2**63 - 1))
    shape = draw(st.lists(dims, max_size=4))
    dtype = draw(st.one_of(st.sampled_from([0, 1, 1, 1, 2, 3, 4]), st.integers(-(2**31), 2**31 - 1)))
    item = {1: 4, 2: 2, 3: 2, 4: 4}.get(dtype, 4)
    n = int(np.prod(shape, dtype=object)) * item if shape and all(d >= 0 for d in shape) else -1
    if 0 <= n <= 8192 and draw(st.booleans()):
        if draw(st.booleans()):  # the right length, float-ish content with specials in it
            values = np.frombuffer(draw(st.binary(min_size=n, max_size=n)), dtype=np.uint8).copy()
            if dtype == 1 and n:
                f = values.view(np.float32)
                f[:] = np.where(np.abs(f) < 1e6, f, 0.5)
                f.flat[draw(st.integers(0, f.size - 1))] = draw(st.sampled_from(SPECIAL))
            data = values.tobytes()
        else:
            data = draw(st.binary(min_size=n, max_size=n))
    else:
        data = draw(st.binary(max_size=256))
    return pb.Tensor(data=data, shape=shape, dtype=dtype)


@st.composite
def requests(draw):
    """A ForwardRequest, valid about one time in three."""
    if draw(st.integers(0, 2)) == 0:
        return valid_request(draw(st.sampled_from(LAYERS)), draw(st.integers(1, 12)), draw(st.integers(0, 2**31 - 1)),
                      draw(st.sampled_from([pb.FLOAT32, pb.FLOAT32, pb.BFLOAT16, pb.FLOAT16])), draw(st.booleans()),
                      draw(st.text(max_size=8)))
    msg = pb.ForwardRequest(
        layer=draw(st.one_of(st.sampled_from(LAYERS), st.integers(-(2**31), 2**31 - 1))),
        hidden=draw(tensors()),
        return_routing=draw(st.booleans()),
        request_id=draw(st.text(max_size=16)),
    )
    if draw(st.integers(0, 3)) == 0:
        msg.router_logits.CopyFrom(draw(tensors(near=(6, 12))))
    return msg


def mutate(rng: random.Random, data: bytes, other: bytes) -> bytes:
    b = bytearray(data)
    op = rng.randrange(9)
    if op == 0 and b:  # flip bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncate
        b = b[: rng.randrange(len(b) + 1)]
    elif op == 2:  # insert random bytes
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 16))
    elif op == 3 and b:  # delete a slice
        i = rng.randrange(len(b))
        del b[i : i + rng.randint(1, 16)]
    elif op == 4 and b:  # overwrite a slice
        i = rng.randrange(len(b))
        n = min(len(b) - i, rng.randint(1, 16))
        b[i : i + n] = rng.randbytes(n)
    elif op == 5 and b:  # duplicate a slice (repeated fields, second values)
        i = rng.randrange(len(b))
        b[i:i] = b[i : i + rng.randint(1, 32)]
    elif op == 6:  # splice two messages
        b = b[: rng.randrange(len(b) + 1)] + other[rng.randrange(len(other) + 1):]
    elif op == 7 and b:  # varint damage: continuation bits, huge lengths
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.choice([0x80, 0xFF, 0x7F, 0x00])
    else:  # anything at all
        b = bytearray(rng.randbytes(rng.randint(0, 64)))
    return bytes(b)


def check_reply(model, raw: bytes, code: grpc.StatusCode, reply: pb.ForwardResponse | None, details: str) -> None:
    """Assert ``code`` is documented, a refusal says why, and a served request came back exact (fp32) or well-formed."""
    assert code in FORWARD_CODES, f"{code}: {details!r} for {raw[:80]!r}"
    assert code == grpc.StatusCode.OK or details, "a refusal says why"
    if code != grpc.StatusCode.OK:
        return
    req = pb.ForwardRequest.FromString(raw)  # it was served: so it parses
    hidden = codec.decode(req.hidden, "hidden")
    out = codec.decode(reply.output, "output")
    assert out.shape == hidden.shape and out.dtype == hidden.dtype and reply.request_id == req.request_id
    if hidden.dtype == torch.float32 and not req.HasField("router_logits"):
        want = model.layer(req.layer)(hidden)  # huge finite inputs overflow alike: compare NaN/Inf as equal
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4, equal_nan=True)


def mutated_requests(rng: random.Random, n: int) -> list[bytes]:
    """``n`` byte-level mutations of valid serialized requests (some with router logits, some half precision)."""
    bases = [valid_request(rng.choice(LAYERS), rng.randint(1, 12), rng.randrange(2**31), rng.choice([1, 1, 2, 3]),
                           rng.random() < 0.5, str(i)).SerializeToString() for i in range(64)]
    with_logits = pb.ForwardRequest.FromString(bases[0])
    with_logits.router_logits.CopyFrom(codec.encode(torch.randn(with_logits.hidden.shape[0], 6)))
    bases.append(with_logits.SerializeToString())
    return [mutate(rng, rng.choice(bases), rng.choice(bases)) for _ in range(n)]
