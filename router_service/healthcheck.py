"""Container health probe: ``python -m moefleet.router_service.healthcheck [ADDRESS] [--service NAME] [--tls-ca CA]``.

Prints ``SERVING`` and exits 0 when the standard ``grpc.health.v1`` service answers
SERVING; otherwise prints the status (or the error) to stderr and exits 1.
Health checks need no token; on a TLS port pass the CA bundle (and, for mutual
TLS, a client certificate and key).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0, *, tls_ca=None, tls_cert=None, tls_key=None) -> bool:
    if tls_ca is not None or tls_cert is not None:
        from .security import channel_credentials

        channel = grpc.secure_channel(address, channel_credentials(tls_ca, tls_cert, tls_key))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            print(f"{address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return False
    ok = reply.status == health_pb2.HealthCheckResponse.SERVING
    if ok:
        print("SERVING")
    else:
        print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("address", nargs="?", default="127.0.0.1:50051")
    p.add_argument("--service", default="")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--tls-ca", help="PEM CA bundle that signed the server's certificate (the port speaks TLS)")
    p.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="client key (mutual TLS)")
    a = p.parse_args(argv)
    return 0 if check(a.address, a.service, a.timeout, tls_ca=a.tls_ca, tls_cert=a.tls_cert, tls_key=a.tls_key) else 1


if __name__ == "__main__":
    sys.exit(main())
