"""The refiner server as a Ray Serve deployment: the project's own app on every replica.

Each replica runs ``diffpo_sdk.server.app.create_app`` behind Serve's FastAPI ingress: the
same ``/v1/refine``, ``/v1/chat/completions``, ``/health`` and ``/metrics`` as ``diffpo
serve``, with its in-replica batching. Ray Serve adds replicas, routing, restarts and
autoscaling; clients use the one Serve URL as their ``DIFFPO_ENDPOINT``.

    serve run integrations/ray_serve/config.yaml     # from the repository root

Settings are read exactly as ``diffpo serve`` reads them: the application's ``args`` in the
config are its command-line flags (``max_batch_items: 8`` is ``--max-batch-items 8``), and
the API key comes from ``DIFFPO_API_KEY`` in the replicas' environment (``runtime_env``).
Replica count, CPUs and GPUs are Serve's own deployment options in the same config.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from integrations.ray_serve.metrics_mirror import RayMetricsMirror


def to_argv(args: dict[str, Any]) -> list[str]:
    """``{"max_batch_items": 8, "log_content": True}`` -> ``["--max-batch-items", "8", "--log-content"]``."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


@serve.deployment(name="diffpo-refiner", health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress()
class DiffPORefinerDeployment:
    """One replica: parses the ``diffpo serve`` flags, then serves the app they describe."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.mirror: RayMetricsMirror | None = None

    async def __serve_build_asgi_app__(self) -> Any:  # Serve's hook: called on the replica, after __init__
        from diffpo_sdk.server.__main__ import build_parser, config_from_args, engine_loader
        from diffpo_sdk.server.app import create_app

        args = build_parser().parse_args(self.argv)
        # host/port belong to Serve's proxy here, so check_bind does not apply; the key still does
        app = create_app(engine_loader(args), config_from_args(args))  # the model loads in the background
        self.state = app.state.diffpo
        self.mirror = RayMetricsMirror(self.state.metrics.registry)
        self.mirror.start()
        return app

    async def check_health(self) -> None:
        """Serve routes to a replica only after its first health check passes; this one waits
        while the model loads (so a loading replica takes no traffic, and Serve only warns about
        a slow start), then fails if the load failed, which makes Serve replace the replica."""
        while self.state.batcher is None and self.state.load_error is None:
            await asyncio.sleep(0.2)
        if self.state.load_error is not None:
            raise RuntimeError(f"the refiner failed to load: {self.state.load_error}")

    async def __del__(self) -> None:
        if self.mirror is not None:
            self.mirror.stop()


def build(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder (``import_path: integrations.ray_serve.deployment:build``)."""
    return DiffPORefinerDeployment.bind(to_argv(args))
