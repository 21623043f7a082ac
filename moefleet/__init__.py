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

from moefleet.core.config import (  # noqa: E402
    CapacitySpec,
    FleetConfig,
    ModelSpec,
    MoELayerSpec,
    RouterConfig,
    WorkerConfig,
)
from moefleet.connect import connect  # noqa: E402
from moefleet.inprocess import MoEModel  # noqa: E402
from moefleet.local import LocalFleet  # noqa: E402
from moefleet.router_service.attach import attach  # noqa: E402
from moefleet.router_service.client import AsyncFleetClient, FleetClient, FleetError  # noqa: E402

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
