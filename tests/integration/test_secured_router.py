"""Authentication, TLS and overload on the router's real gRPC port (loopback), over in-process workers: no Ray."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from moefleet import MoEModel
from moefleet.core.config import RouterConfig
from moefleet.router_service import security
from moefleet.router_service.client import AsyncFleetClient, FleetClient, FleetError
from moefleet.router_service.proto import fleet_pb2 as pb
from moefleet.router_service.proto import fleet_pb2_grpc as pb_grpc
from tests import hf_models
from tests.integration.router_in_process import InProcessRouter
from tests.tls_certs import make_pki

pytestmark = [pytest.mark.integration]

TOKEN = "a-long-random-token-0123456789"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    model, _ = hf_models.build("mixtral")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model(checkpoint):
    return MoEModel.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return str(path)


def _exact(client: FleetClient, model: MoEModel) -> None:
    hidden = torch.randn(7, model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(3))
    for layer in model.moe_layers:
        got = client.forward(layer, hidden)
        assert (got - model.layer(layer)(hidden)).abs().max().item() <= 1e-5, layer


# -- bearer token -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def authed(checkpoint, token_file):
    with InProcessRouter(checkpoint, RouterConfig(auth_token_file=token_file)) as router:
        yield router


def test_no_token_and_wrong_token_are_unauthenticated(authed, model, monkeypatch):
    monkeypatch.delenv(security.AUTH_TOKEN_ENV, raising=False)
    hidden = torch.randn(2, model.spec.layer.hidden_size)
    for kwargs in ({}, {"token": "wrong"}, {"token": TOKEN + "x"}, {"token": TOKEN[:-1]}):
        with FleetClient(authed.address, **kwargs) as client:
            with pytest.raises(FleetError) as e:
                client.forward(model.moe_layers[0], hidden)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED, kwargs
            assert TOKEN not in e.value.message and "wrong" not in e.value.message
            with pytest.raises(FleetError) as e:
                client.placement()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(authed.address) as channel:  # a scheme other than Bearer
        stub = pb_grpc.MoEFleetStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetPlacement(pb.GetPlacementRequest(), metadata=(("authorization", f"Basic {TOKEN}"),))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert authed.server.auth.refused >= 9


def test_right_token_gives_the_exact_output(authed, model):
    with FleetClient(authed.address, token=TOKEN) as client:
        _exact(client, model)


def test_client_reads_the_token_from_the_environment(authed, model, monkeypatch):
    monkeypatch.setenv(security.AUTH_TOKEN_ENV, TOKEN)
    with FleetClient(authed.address) as client:
        _exact(client, model)


def test_health_checks_are_open_without_a_token(authed):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(authed.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from moefleet.router_service.healthcheck import check

    assert check(authed.address)


def test_stream_without_the_token_is_unauthenticated(authed, model, monkeypatch):
    monkeypatch.delenv(security.AUTH_TOKEN_ENV, raising=False)
    from moefleet.router_service import codec

    request = pb.ForwardRequest(layer=model.moe_layers[0], hidden=codec.encode(torch.randn(2, model.spec.layer.hidden_size)))

    async def refused():
        async def requests():  # the refusal comes on the headers, before any message: nothing is sent until then
            await asyncio.sleep(0.5)
            yield request

        async with grpc.aio.insecure_channel(authed.address) as channel:
            call = pb_grpc.MoEFleetStub(channel).ForwardStream(requests(), metadata=(("authorization", "Bearer wrong"),))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [r async for r in call]
            return e.value

    error = asyncio.run(refused())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "invalid bearer token" in error.details()

    async def accepted():
        client = AsyncFleetClient(authed.address, token=TOKEN)
        try:
            return [r async for r in client.forward_stream([(model.moe_layers[0], torch.randn(2, 32))] * 3)]
        finally:
            await client.close()

    replies = asyncio.run(accepted())
    assert len(replies) == 3 and all(isinstance(r, torch.Tensor) for _, r in replies)


def test_a_router_beyond_loopback_refuses_to_start_without_a_token(checkpoint, monkeypatch):
    monkeypatch.delenv(security.AUTH_TOKEN_ENV, raising=False)
    cfg = RouterConfig(host="0.0.0.0")
    with pytest.raises(security.SecurityConfigError, match="authentication is required"):
        InProcessRouter(checkpoint, cfg)  # refused before anything binds


# -- TLS and mutual TLS -------------------------------------------------------------------------
def test_tls_round_trip_is_exact_and_plaintext_is_refused(checkpoint, model, pki):
    cfg = RouterConfig(tls_cert=pki.server.cert, tls_key=pki.server.key)
    with InProcessRouter(checkpoint, cfg) as router:
        with FleetClient(router.address, tls_ca=pki.ca) as client:
            client.wait_ready(30)
            _exact(client, model)
        with FleetClient(router.address, timeout=5) as plain:
            with pytest.raises(FleetError) as e:
                plain.placement()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
        with FleetClient(router.address, tls_ca=pki.stranger.cert, timeout=5) as wrong_ca:  # does not trust the server
            with pytest.raises(FleetError) as e:
                wrong_ca.placement()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_round_trip_and_a_client_without_its_certificate_is_refused(checkpoint, model, pki, token_file):
    cfg = RouterConfig(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca, auth_token_file=token_file)
    with InProcessRouter(checkpoint, cfg) as router:
        with FleetClient(router.address, tls_ca=pki.ca, tls_cert=pki.client.cert, tls_key=pki.client.key, token=TOKEN) as client:
            _exact(client, model)
        for kwargs in ({}, {"tls_cert": pki.stranger.cert, "tls_key": pki.stranger.key}):
            with FleetClient(router.address, tls_ca=pki.ca, token=TOKEN, timeout=5, **kwargs) as refused:
                with pytest.raises(FleetError) as e:
                    refused.placement()
                assert e.value.code == grpc.StatusCode.UNAVAILABLE, kwargs
        # a certificate alone is not enough: the token is still checked
        with FleetClient(router.address, tls_ca=pki.ca, tls_cert=pki.client.cert, tls_key=pki.client.key, token="no") as c:
            with pytest.raises(FleetError) as e:
                c.placement()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_healthcheck_probe_speaks_tls(checkpoint, pki, capsys):
    from moefleet.router_service.healthcheck import main

    cfg = RouterConfig(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca)
    with InProcessRouter(checkpoint, cfg) as router:
        capsys.readouterr()
        assert main([router.address, "--tls-ca", pki.ca, "--tls-cert", pki.client.cert, "--tls-key", pki.client.key]) == 0
        assert capsys.readouterr().out == "SERVING\n"  # what the guide's comment promises
        assert main([router.address, "--tls-ca", pki.ca, "--timeout", "3"]) == 1  # no client certificate
        out = capsys.readouterr()
        assert out.out == "" and router.address in out.err


# -- overload and flow control ------------------------------------------------------------------
def test_overload_is_resource_exhausted_at_once_with_a_retry_hint(checkpoint, model):
    cfg = RouterConfig(batch_window_ms=300, max_inflight_tokens=16, max_request_tokens=16, dispatch_when_idle=False)
    with InProcessRouter(checkpoint, cfg) as router:
        h = model.spec.layer.hidden_size

        async def run():
            client = AsyncFleetClient(router.address)
            try:
                return await asyncio.gather(*(client.forward(model.moe_layers[0], torch.randn(8, h)) for _ in range(4)),
                                            return_exceptions=True)
            finally:
                await client.close()

        results = asyncio.run(run())
        refused = [r for r in results if isinstance(r, FleetError)]
        served = [r for r in results if isinstance(r, torch.Tensor)]
        assert len(served) == 2 and len(refused) == 2, results  # 2 x 8 tokens fill max_inflight_tokens
        for e in refused:
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_inflight_tokens" in e.message
            assert e.retry_after_ms is not None and e.retry_after_ms >= 10 and f"retry after {e.retry_after_ms} ms" in e.message
        assert (router.core.inflight_tokens, router.core.inflight_bytes, router.core._queued) == (0, 0, 0)


def test_a_full_router_refuses_before_reading_the_message(checkpoint, model):
    """While full, Forward is refused on its headers: even bytes that are no message get RESOURCE_EXHAUSTED."""
    cfg = RouterConfig(batch_window_ms=1500, max_queued_requests=2, dispatch_when_idle=False)  # both wait in the window
    with InProcessRouter(checkpoint, cfg) as router:
        h = model.spec.layer.hidden_size

        async def run():
            client = AsyncFleetClient(router.address)
            channel = grpc.aio.insecure_channel(router.address)
            raw = channel.unary_unary("/moefleet.v1.MoEFleet/Forward", request_serializer=None,
                                      response_deserializer=pb.ForwardResponse.FromString)
            try:
                held = [asyncio.create_task(client.forward(model.moe_layers[0], torch.randn(2, h))) for _ in range(2)]
                await asyncio.sleep(0.5)  # both admitted, waiting out the batch window
                assert router.core.full() is not None
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await raw(b"\xff\xfe not a ForwardRequest", timeout=10)
                served = await asyncio.gather(*held)
                return e.value, served
            finally:
                await client.close()
                await channel.close()

        error, served = asyncio.run(run())
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queued_requests=2" in error.details()
        assert dict(error.trailing_metadata())["grpc-retry-pushback-ms"].isdigit()
        assert len(served) == 2 and router.core.stats.rejected_full == 1
        with FleetClient(router.address) as c:  # room again: the same bytes are now read, and refused as what they are
            channel = c.channel.unary_unary("/moefleet.v1.MoEFleet/Forward", request_serializer=None,
                                            response_deserializer=pb.ForwardResponse.FromString)
            with pytest.raises(grpc.RpcError) as e:
                channel(b"\xff\xfe not a ForwardRequest", timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_reader_is_held_back_while_the_client_does_not_read(checkpoint, model):
    """Flow control end to end: unread replies stop the router reading; reading again drains every item, exact."""
    window = 4
    cfg = RouterConfig(stream_window=window, batch_window_ms=0)
    n, t = 600, 256  # replies of 256 x 32 fp32 = 32 KiB each: a few fill HTTP/2's windows
    h = model.spec.layer.hidden_size
    hs = [torch.randn(t, h, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    layer = model.moe_layers[0]
    with InProcessRouter(checkpoint, cfg) as router:

        async def run():
            channel = grpc.aio.insecure_channel(router.address)
            stub = pb_grpc.MoEFleetStub(channel)
            from moefleet.router_service import codec

            def requests():
                for i in range(n):
                    yield pb.ForwardRequest(layer=layer, hidden=codec.encode(hs[i % len(hs)]), request_id=str(i))

            call = stub.ForwardStream(requests())
            await asyncio.sleep(3.0)  # the client reads nothing
            held = router.core.stats.requests
            replies = [r async for r in call]
            await channel.close()
            return held, replies

        held, replies = asyncio.run(run())
        assert held < n / 2, f"{held} of {n} items were read while no reply was: no back-pressure"
        assert sorted(int(r.request_id) for r in replies) == list(range(n))
        from moefleet.router_service import codec

        want = [model.layer(layer)(x) for x in hs]
        for r in replies:
            assert r.error_code == 0
            assert (codec.decode(r.output, "output") - want[int(r.request_id) % len(hs)]).abs().max().item() <= 1e-5
