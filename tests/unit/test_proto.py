"""The checked-in generated gRPC code is what the .proto generates."""

from pathlib import Path

from moefleet.router_service.proto import generate


def test_generated_code_matches_proto(tmp_path):
    written = generate.generate(tmp_path)
    assert [p.name for p in written] == list(generate.FILES)
    for p in written:
        checked_in = (generate.HERE / p.name).read_text()
        assert p.read_text() == checked_in, f"{p.name} is stale: run python -m moefleet.router_service.proto.generate"


def test_proto_is_versioned_package():
    text = (generate.HERE / generate.PROTO).read_text()
    assert "package moefleet.v1;" in text
    assert Path(generate.HERE / generate.PROTO).parent.name == "v1"
