"""MoE Fleet: elastic expert serving for Mixture-of-Experts models on Ray."""

import os as _os

# In a source checkout the component folders (kernels/, controller/, ...) sit
# beside this package rather than inside it; pyproject.toml maps them to
# ``moefleet.<name>`` when installed. Make the same names resolve when the
# checkout itself is on ``sys.path`` (``python -m`` from the repository root).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(
    _os.path.join(_root, "kernels")
):
    __path__.append(_root)  # type: ignore[name-defined]

__version__ = "0.1.0"

# The public API is imported on first use (PEP 562): a process that needs one component (an expert worker
# imports ``moefleet.expert_workers.group``) does not pay for importing them all.
_API = {
    "CapacitySpec": "moefleet.core.config",
    "FleetConfig": "moefleet.core.config",
    "ModelSpec": "moefleet.core.config",
    "MoELayerSpec": "moefleet.core.config",
    "RouterConfig": "moefleet.core.config",
    "WorkerConfig": "moefleet.core.config",
    "connect": "moefleet.connect",
    "MoEModel": "moefleet.inprocess",
    "LocalFleet": "moefleet.local",
    "attach": "moefleet.router_service.attach",
    "AsyncFleetClient": "moefleet.router_service.client",
    "FleetClient": "moefleet.router_service.client",
    "FleetError": "moefleet.router_service.client",
}


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'moefleet' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))


__all__ = [
    "AsyncFleetClient",
    "CapacitySpec",
    "FleetClient",
    "FleetConfig",
    "FleetError",
    "LocalFleet",
    "MoELayerSpec",
    "ModelSpec",
    "MoEModel",
    "RouterConfig",
    "WorkerConfig",
    "attach",
    "connect",
    "__version__",
]
