"""``moefleet.connect``: one way in to a fleet, over gRPC or with the router in the caller's process."""

from __future__ import annotations

import os
from typing import Any


def connect(address: str | None = None, *, embedded: bool = False, token: str | None = None, **kwargs: Any):
    """A client of a fleet: ``.forward(layer, hidden, *, router_logits=None, return_routing=False)``,
    ``.placement()`` and ``.close()``, with ``FleetClient``'s semantics and errors (``FleetError``).

    address: None for the local fleet that ``moe-fleet up`` started (found the way ``moe-fleet status`` finds
    it); ``host:port`` for that fleet's gRPC router.
    embedded: run the router core in this process (``EmbeddedRouter``): this process attaches to the fleet's
    Ray cluster as a driver (unless it already is attached, e.g. inside a Ray actor), follows its placement,
    heartbeats as a router and calls the workers on its own compiled graph — no gRPC hop. For a fleet other
    than the local one, pass ``ray_address``, ``redis_url``, ``namespace`` and ``checkpoint``.
    token: the router's bearer token (gRPC only; default the local fleet's token file, else
    ``$MOEFLEET_AUTH_TOKEN``).

    Other keywords go to ``FleetClient`` (``tls_ca``, ``timeout``, ...) or, embedded, to ``EmbeddedRouter``
    (``device``, ``compiled_graphs``, ``config``).
    """
    from moefleet.local import read_local_state

    state = read_local_state()
    if not embedded:
        from moefleet.router_service.client import FleetClient

        if address is None:
            if state is None:
                raise ConnectionError("moefleet.connect: no local fleet is running (start one with 'moe-fleet up', or pass an address)")
            address = state["address"]
        if token is None and state is not None and state.get("address") == address and state.get("auth_token_file"):
            from moefleet.core.secrets import read_secret_file

            token = read_secret_file(state["auth_token_file"], "auth_token_file")
        return FleetClient(address, token=token, **kwargs)

    fleet = {k: kwargs.pop(k) for k in ("ray_address", "redis_url", "namespace", "checkpoint", "dtype") if k in kwargs}
    if state is not None and (address is None or address == state.get("address")):
        for k in ("ray_address", "redis_url", "namespace", "checkpoint", "dtype"):
            fleet.setdefault(k, state.get(k))
    missing = [k for k in ("redis_url", "namespace", "checkpoint") if not fleet.get(k)]
    if missing:
        where = "no local fleet is running" if state is None else f"{address} is not the local fleet ({state.get('address')})"
        raise ConnectionError(f"moefleet.connect(embedded=True): {where}; pass {', '.join(missing)} (and ray_address)")
    import ray

    if not ray.is_initialized():
        if not fleet.get("ray_address"):
            raise ConnectionError("moefleet.connect(embedded=True): the fleet's Ray address is unknown; pass ray_address")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        from moefleet.core.processes import INLINE_BYTES

        # the serving processes' inline limit: a call's batch up to it travels inside the call to the workers
        os.environ.setdefault("RAY_max_direct_call_object_size", str(INLINE_BYTES))
        ray.init(address=fleet["ray_address"], namespace=fleet["namespace"], log_to_driver=False)
    from moefleet.router_service.embedded import EmbeddedRouter

    return EmbeddedRouter(fleet["checkpoint"], fleet["redis_url"], fleet["namespace"], dtype=fleet.get("dtype"), **kwargs)
