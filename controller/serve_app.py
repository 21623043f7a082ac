"""The controller as a Ray Serve application, deployed beside the fleet's by ``moe-fleet deploy``.

One replica, on the head node, runs ``Controller.run`` in a thread and serves
the fleet's telemetry (``/metrics``, the dashboard, ``/api/state``) on
``http_host:http_port`` (127.0.0.1:8470 unless configured). Serve restarts the
replica when its health check fails (the control loop died); the new one leads
once the old lease lapses. The application has no HTTP route: nothing reaches
it through Serve's proxy.

Its ``args`` are a ``ControllerConfig`` (``ray_address`` is ignored: the
replica runs inside the cluster). ``redis_url`` stays out of the config, as
for the fleet's application: the replica reads ``MOEFLEET_REDIS_URL``.
"""

from __future__ import annotations

import logging
import threading

from ray import serve

from moefleet.core.processes import serving_runtime_env

log = logging.getLogger(__name__)

APP_NAME = "moefleet-controller"
IMPORT_PATH = "moefleet.controller.serve_app:build_app"
HEAD_NODE_RESOURCE = "node:__internal_head__"


@serve.deployment(num_replicas=1, max_ongoing_requests=4, health_check_period_s=5.0,
                  ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001},
                                     "runtime_env": serving_runtime_env()})
class FleetController:
    """The fleet's controller and its telemetry endpoint, in one Serve replica."""

    def __init__(self, config: dict):
        from .http import TelemetryServer
        from .main import Controller, ControllerConfig

        moefleet_log = logging.getLogger("moefleet")  # the controller's state changes (INFO) reach the replica's log
        if not moefleet_log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            moefleet_log.addHandler(handler)
            moefleet_log.setLevel(logging.INFO)
        cfg = ControllerConfig(**{**config, "ray_address": None})
        self.controller = Controller(cfg)
        self.stop_event = threading.Event()
        self.http = None
        if cfg.http_port is not None:
            self.http = TelemetryServer(self.controller.store, cfg.telemetry, cfg.http_host, cfg.http_port)
            log.info("telemetry endpoint on http://%s (/metrics, /, /api/state)", self.http.start())
        self.thread = threading.Thread(target=self.controller.run, args=(self.stop_event,), name="moefleet-controller",
                                       daemon=True)
        self.thread.start()

    def check_health(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError("the control loop stopped")

    def status(self) -> dict:
        """The controller's state and last report (``serve``'s handle; ``moe-fleet status`` reads the store)."""
        c = self.controller
        return {"leader": c.leader, "holder": c.holder, "status": c.status, "last_report": c.last_report}

    def __del__(self):
        self.stop_event.set()
        if getattr(self, "thread", None) is not None and self.thread.is_alive():
            self.thread.join(timeout=30)
        if getattr(self, "http", None) is not None:
            self.http.stop()


def build_app(args: dict):
    """Application builder (``import_path: moefleet.controller.serve_app:build_app``); ``args``: a ControllerConfig."""
    from .main import ControllerConfig

    ControllerConfig(**{**args, "ray_address": None})  # fail at deploy time, naming the bad field
    return FleetController.bind(args)
