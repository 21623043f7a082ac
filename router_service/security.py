"""Who may call the router: bearer-token authentication and TLS / mutual TLS on the gRPC port.

Token: every RPC except ``grpc.health.v1.Health`` carries metadata
``authorization: Bearer <token>``; the token comes from ``auth_token_file``
or ``$MOEFLEET_AUTH_TOKEN`` and is compared in constant time. A missing or
wrong token is ``UNAUTHENTICATED``; the reply never echoes what was sent.
A router that binds anything but loopback refuses to start without a token
unless ``require_auth: false`` says so.

TLS: ``tls_cert`` + ``tls_key`` (PEM files) make the port speak TLS;
``tls_client_ca`` also requires a client certificate signed by that CA.
Clients pass the CA bundle that signed the server's certificate
(``FleetClient(address, tls_ca=...)``) and, for mutual TLS, their own
certificate and key.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

import grpc

from moefleet.core.config import RouterConfig
from moefleet.core.secrets import SecretFileError, read_secret_file

AUTH_TOKEN_ENV = "MOEFLEET_AUTH_TOKEN"
AUTH_METADATA_KEY = "authorization"
BEARER = "Bearer "
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods served without a token: load balancers and kubelets probe health unauthenticated."""


class SecurityConfigError(ValueError):
    """Authentication or TLS settings that cannot be used; the message names the setting, never a secret."""


# -- tokens --------------------------------------------------------------------------------------
def load_token(token_file: str | None = None, environ=None) -> str | None:
    """The router's bearer token: the content of ``token_file`` if given, else ``$MOEFLEET_AUTH_TOKEN``, else None."""
    environ = os.environ if environ is None else environ
    if token_file:
        try:
            return read_secret_file(token_file, "auth_token_file")
        except SecretFileError as e:
            raise SecurityConfigError(str(e)) from None
    token = environ.get(AUTH_TOKEN_ENV, "").strip()
    return token or None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: an address only this machine reaches."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def auth_required(config: RouterConfig) -> bool:
    """Whether the router must have a token: ``require_auth`` if set, else unless it binds loopback."""
    return config.require_auth if config.require_auth is not None else not is_loopback(config.host)


def resolve_token(config: RouterConfig, environ=None) -> str | None:
    """The token a router with ``config`` checks (None: no authentication); raises when one is required and absent."""
    token = load_token(config.auth_token_file, environ)
    if token is None and auth_required(config):
        raise SecurityConfigError(
            f"router: authentication is required on {config.host} (not loopback): set ${AUTH_TOKEN_ENV} or "
            "auth_token_file, or set require_auth: false to serve without it"
        )
    return token


def bearer_metadata(token: str) -> tuple[str, str]:
    """The metadata pair a client sends: ``("authorization", "Bearer <token>")``."""
    return (AUTH_METADATA_KEY, BEARER + token)


def check_bearer(metadata, token: str) -> str | None:
    """None if ``metadata`` (pairs) carries ``token``; else why not (a message with no secret in it)."""
    values = [v for k, v in (metadata or ()) if k.lower() == AUTH_METADATA_KEY]
    if not values:
        return "missing bearer token: send metadata 'authorization: Bearer <token>'"
    want = token.encode()
    ok = False
    for value in values:
        value = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        given = value[len(BEARER):].strip() if value[: len(BEARER)].lower() == BEARER.lower() else ""
        ok |= hmac.compare_digest(given.encode(), want)  # constant time in the token's content
    return None if ok else "invalid bearer token"


def refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, trailing_metadata=(), on_refuse=None):
    """A handler standing in for ``handler`` that answers ``code`` without reading the request message.

    It takes the request as a stream whatever the method's kind (on the wire a unary request is a
    stream of one message), so a refused call's message is never received into Python.
    ``on_refuse`` runs when the refusal is sent (counting it then, not when the handler is made).
    """

    async def refuse(_request_iterator, context):
        if on_refuse is not None:
            on_refuse()
        await context.abort(code, message, trailing_metadata=tuple(trailing_metadata))

    if handler.unary_unary or handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health checks that does not carry the token (``UNAUTHENTICATED``)."""

    def __init__(self, token: str, open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES):
        if not token:
            raise SecurityConfigError("auth token: empty")
        self._token = token
        self._open = open_prefixes
        self.refused = 0

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        why = check_bearer(handler_call_details.invocation_metadata, self._token)
        handler = await continuation(handler_call_details)
        if why is None or handler is None:  # an unknown method is UNIMPLEMENTED either way
            return handler
        return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, why, on_refuse=self._count)

    def _count(self) -> None:
        self.refused += 1


# -- TLS -----------------------------------------------------------------------------------------
def _read_pem(value: str | bytes | os.PathLike[str], what: str) -> bytes:
    """PEM bytes: ``value`` itself if it is PEM bytes, else the content of the file it names."""
    if isinstance(value, bytes):
        if b"-----BEGIN" in value:
            return value
        value = value.decode()
    try:
        data = Path(value).read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"{what}: cannot read {str(value)!r}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise SecurityConfigError(f"{what}: {str(value)!r} is not PEM")
    return data


def server_credentials(config: RouterConfig) -> grpc.ServerCredentials | None:
    """TLS credentials of the router's port from ``tls_cert``/``tls_key``/``tls_client_ca``; None for plaintext."""
    if config.tls_cert is None:
        return None
    cert = _read_pem(config.tls_cert, "tls_cert")
    key = _read_pem(config.tls_key, "tls_key")
    ca = _read_pem(config.tls_client_ca, "tls_client_ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(
    tls_ca: str | bytes | None = None, tls_cert: str | bytes | None = None, tls_key: str | bytes | None = None
) -> grpc.ChannelCredentials:
    """Client TLS credentials: the CA bundle that signed the server (None: the system roots), and for
    mutual TLS the client's own certificate chain and key (paths or PEM bytes)."""
    if (tls_cert is None) != (tls_key is None):
        raise SecurityConfigError("tls_cert: tls_cert and tls_key are given together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(tls_ca, "tls_ca") if tls_ca is not None else None,
        private_key=_read_pem(tls_key, "tls_key") if tls_key is not None else None,
        certificate_chain=_read_pem(tls_cert, "tls_cert") if tls_cert is not None else None,
    )
