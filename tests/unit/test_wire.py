"""Tensor payloads written and read beside protobuf: the same messages, the data copied once out and never in."""

from __future__ import annotations

import pytest
import torch
from google.protobuf.message import DecodeError

from moefleet.router_service import codec, wire
from moefleet.router_service.client import parse_reply, request_bytes, result
from moefleet.router_service.proto import fleet_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 5), (0, 5), (1, 1)])
def test_encoded_request_is_the_message_protobuf_would_write(dtype, shape):
    hidden = torch.randn(shape).to(dtype)
    logits = torch.randn(shape[0], 3)
    raw = request_bytes(4, hidden, logits, True, request_id="r-1")
    want = pb.ForwardRequest(layer=4, return_routing=True, request_id="r-1", hidden=codec.encode(hidden),
                             router_logits=codec.encode(logits))
    assert pb.ForwardRequest.FromString(raw) == want


def test_decoded_tensor_is_a_view_of_the_received_bytes():
    hidden = torch.randn(64, 32)
    raw = request_bytes(0, hidden, None, False)
    msg, data = wire.decode(raw, pb.ForwardRequest, "hidden")
    assert msg.hidden.data == b"" and list(msg.hidden.shape) == [64, 32]
    assert data.obj is raw  # a view of the buffer, not a copy
    t = codec.decode(msg.hidden, "hidden", data=data, writable=False)
    assert torch.equal(t, hidden)
    writable = codec.decode(msg.hidden, "hidden", data=data)
    writable += 1  # a copy: the received bytes are untouched
    assert torch.equal(codec.decode(msg.hidden, "hidden", data=data, writable=False), hidden)


def test_messages_written_by_protobuf_decode_the_same():
    out = torch.randn(9, 4)
    ids = torch.randint(0, 8, (9, 2), dtype=torch.int32)
    reply = pb.ForwardResponse(output=codec.encode(out), topk_ids=codec.encode(ids), topk_weights=codec.encode(torch.rand(9, 2)),
                               request_id="7", placement_version=3)
    msg, data = parse_reply(reply.SerializeToString())
    assert msg.request_id == "7" and msg.placement_version == 3
    got, got_ids, _ = result(msg, data, True)
    assert torch.equal(got, out) and torch.equal(got_ids, ids.long())


def test_the_last_data_of_a_repeated_tensor_field_wins_as_when_parsed():
    a, b = torch.ones(2, 2), torch.zeros(2, 2)
    second = pb.ForwardRequest(hidden=pb.Tensor(data=codec.encode(b).data))  # data only: shape and dtype come from the first
    raw = pb.ForwardRequest(hidden=codec.encode(a)).SerializeToString() + second.SerializeToString()
    msg, data = wire.decode(raw, pb.ForwardRequest, "hidden")
    assert torch.equal(codec.decode(msg.hidden, "hidden", data=data), codec.decode(pb.ForwardRequest.FromString(raw).hidden, "hidden"))
    assert torch.equal(codec.decode(msg.hidden, "hidden", data=data), b)


def test_unaligned_data_is_copied_to_an_aligned_tensor():
    hidden = torch.randn(16, 8)
    for rid in ("", "x", "xy", "xyz"):  # shifts where the data starts
        raw = request_bytes(0, hidden, None, False, request_id=rid)
        msg, data = wire.decode(raw, pb.ForwardRequest, "hidden")
        t = codec.decode(msg.hidden, "hidden", data=data, writable=False)
        assert t.data_ptr() % 4 == 0 and torch.equal(t, hidden)


def test_malformed_bytes_are_a_decode_error():
    raw = request_bytes(0, torch.randn(4, 4), None, False)
    with pytest.raises(DecodeError):
        wire.decode(raw[:-7] + b"\xff\xff\xff", pb.ForwardRequest, "hidden")
    with pytest.raises(DecodeError):
        wire.decode(b"\x12\xff\xff\xff\xff\x0f", pb.ForwardRequest, "hidden")  # a length past the end


def test_fields_the_fast_path_does_not_take_fall_back_to_protobuf():
    # field 9 as a group (wire types 3/4): protobuf skips it as an unknown field
    raw = request_bytes(2, torch.randn(3, 3), None, False) + b"\x4b\x50\x01\x4c"
    msg, data = wire.decode(raw, pb.ForwardRequest, "hidden")
    assert data is None and msg.layer == 2 and len(msg.hidden.data) == 36


def test_bad_tensor_metadata_names_the_field():
    msg = pb.ForwardRequest()
    data = codec.describe(msg.hidden, torch.randn(4, 4))
    msg.hidden.shape[:] = [4, 5]
    with pytest.raises(codec.TensorError, match="hidden.data: 64 bytes disagree"):
        codec.decode(msg.hidden, "hidden", data=data)
