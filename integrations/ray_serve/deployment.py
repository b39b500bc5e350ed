"""The refiner server as a Ray Serve deployment: replicas, one per GPU, autoscaled on load.

Each replica runs the project's own FastAPI app (``diffpo_sdk.server.app.create_app``):
the same ``/v1/refine``, ``/v1/chat/completions``, ``/health`` and ``/metrics`` as
``diffpo serve``, with its in-replica batching. Ray Serve adds the replicas, routing and
autoscaling; clients use the one Serve URL as their ``DIFFPO_ENDPOINT``.

    pip install "ray[serve]" "diffpo-sdk[server]"
    DIFFPO_MODEL=RuizheChen/DiffPO-9B serve run integrations.ray_serve.deployment:app
    # or: serve run integrations/ray_serve/config.yaml

Settings come from the environment of the replicas (set them in ``runtime_env`` of the
config): ``DIFFPO_MODEL``, ``DIFFPO_DEVICE``, ``DIFFPO_DTYPE``, ``DIFFPO_ADAPTER``,
``DIFFPO_SERVER_API_KEY`` (Bearer token the app checks), ``DIFFPO_UPSTREAM_MODEL``.
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve


def build_app() -> Any:
    """Evaluated on each replica, so every replica loads its own model on its own GPU."""
    from diffpo_sdk.server.app import create_app
    from diffpo_sdk.server.config import ServerConfig

    def load() -> Any:
        from diffpo_sdk.engine import RefinerEngine

        return RefinerEngine.from_pretrained(
            os.environ.get("DIFFPO_MODEL", "smollm2-135m-instruct"),
            device=os.environ.get("DIFFPO_DEVICE", "auto"),
            dtype=os.environ.get("DIFFPO_DTYPE", "auto"),
            adapter=os.environ.get("DIFFPO_ADAPTER") or None,
        )

    config = ServerConfig(
        api_key=os.environ.get("DIFFPO_SERVER_API_KEY") or None,
        upstream_model=os.environ.get("DIFFPO_UPSTREAM_MODEL") or None,
        max_batch_items=int(os.environ.get("DIFFPO_MAX_BATCH_ITEMS", "16")),
    )
    # the model loads in the background; /health answers 503 until it is ready
    return create_app(load, config)


@serve.deployment(
    name="diffpo-refiner",
    ray_actor_options={"num_gpus": float(os.environ.get("DIFFPO_GPUS_PER_REPLICA", "1"))},
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": int(os.environ.get("DIFFPO_MAX_REPLICAS", "4")),
        # requests in flight per replica that autoscaling aims for; the in-replica batcher
        # merges them, so allow a full batch or two per replica
        "target_ongoing_requests": 16,
    },
    max_ongoing_requests=64,
    health_check_period_s=10,
    health_check_timeout_s=30,
)
@serve.ingress(build_app)
class DiffPORefinerDeployment:
    """One replica: the app from :func:`build_app` serves every route."""


app = DiffPORefinerDeployment.bind()
