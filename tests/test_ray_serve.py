"""Ray Serve, for real: the deployment of ``integrations/ray_serve/config.yaml`` (2 CPU replicas
of the built-in refiner) on a local Ray bound to 127.0.0.1, driven over HTTP through Serve's proxy.

Deselect with ``-m "not ray"``. Ray is started with its CPU count fixed and no dashboard, and
shut down at the end of the module.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from engine_oracle import greedy_reference
from fastapi import FastAPI, Request
from test_server_support import serve

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "integrations" / "ray_serve" / "config.yaml"
API_KEY = "ray-serve-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OPTS = {"block_size": 8, "max_new_tokens": 16}
UPSTREAM_ANSWER = "Paris is the capital of France. It is known for the Eiffel Tower."
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
ITEMS = [
    {"prompt": "Name three primary colors.", "draft": "Red, green and purple are the primary colors."},
    {"prompt": "What is 12 times 12?", "draft": "12 times 12 is 124."},
    {"prompt": "Give me a tip for sleeping better.", "draft": "Drink coffee late at night to relax."},
    {"prompt": "How many legs does a spider have?", "draft": "A spider has six legs."},
    {"prompt": "Write a haiku about the sea.", "draft": "The sea is big and blue and wet."},
    {"prompt": "Suggest a name for a pet goldfish.", "draft": "Call it Rover."},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 180.0, every: float = 0.25) -> Any:
    """Poll ``check`` until it returns something truthy (state, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def oracle() -> Any:
    """The same built-in refiner in this process, for ``model.generate`` greedy answers."""
    import torch

    from diffpo_sdk.engine import RefinerEngine

    torch.set_num_threads(1)
    engine = RefinerEngine.from_pretrained("smollm2-135m-instruct", device="cpu", calibrate=False)

    def answer(item: dict[str, Any]) -> str:
        ids = greedy_reference(engine, item, OPTS["max_new_tokens"])
        return engine.tokenizer.decode(ids, skip_special_tokens=True)

    return answer


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """A stand-in for the upstream LLM of ``/v1/chat/completions``: one canned answer."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await request.json()
        return {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": UPSTREAM_ANSWER}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 15, "total_tokens": 24}}

    with serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def cluster(upstream: str) -> Iterator[dict[str, Any]]:
    """Local Ray + Serve on 127.0.0.1 running the config's deployment; shut down afterwards."""
    import ray
    import yaml
    from ray import serve as ray_serve

    config = yaml.safe_load(CONFIG.read_text())
    app_cfg = config["applications"][0]
    deployment_options = {k: v for k, v in app_cfg["deployments"][0].items() if k != "name"}
    assert deployment_options["num_replicas"] == 2 and deployment_options["ray_actor_options"]["num_gpus"] == 0
    env = {**app_cfg["runtime_env"]["env_vars"], "DIFFPO_API_KEY": API_KEY, "OPENAI_API_KEY": "sk-stub",
           "RAY_USAGE_STATS_ENABLED": "0"}
    old_cwd, old_path, old_stats = os.getcwd(), list(sys.path), os.environ.get("RAY_USAGE_STATS_ENABLED")
    try:
        os.chdir(REPO)  # as `serve run` from the repository root: Ray puts the driver's cwd on workers' path
        sys.path.insert(0, str(REPO))
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no reporting home from a test
        ray.init(
            num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
            object_store_memory=100 * 1024 * 1024, runtime_env={"env_vars": env},
            _system_config={"metrics_report_interval_ms": 1000, "enable_worker_prestart": False},
        )
        from integrations.ray_serve.deployment import DiffPORefinerDeployment, to_argv

        # Ports are taken once Ray's own processes hold theirs: a port chosen before ray.init can be
        # handed to one of them too (seen in CI: the metrics agent failed with "address already in use").
        metrics_port = ray.nodes()[0]["MetricsExportPort"]
        http_port = free_port()
        ray_serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        args = {**app_cfg["args"], "upstream_model": "openai/stub-model", "upstream_api_base": f"{upstream}/v1"}
        app = DiffPORefinerDeployment.options(**deployment_options).bind(to_argv(args))
        ray_serve.run(app, name=app_cfg["name"], route_prefix=app_cfg["route_prefix"])  # returns once replicas are healthy
        yield {"url": f"http://127.0.0.1:{http_port}", "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
               "app": app_cfg["name"]}
    finally:
        if ray.is_initialized():
            ray_serve.shutdown()
            ray.shutdown()
        os.chdir(old_cwd)
        sys.path[:] = old_path
        if old_stats is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = old_stats


def replica_names() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and "SERVE_REPLICA" in a["name"])


def running_replicas(app: str) -> int:
    from ray import serve as ray_serve

    status = ray_serve.status().applications[app]
    deployment = status.deployments["diffpo-refiner"]
    return deployment.replica_states.get("RUNNING", 0) if status.status == "RUNNING" else 0


def test_refine_and_chat_through_serve_answer_like_greedy_generate(cluster, oracle):
    url = cluster["url"]
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert httpx.post(f"{url}/v1/refine", json={"items": ITEMS[:1]}, timeout=30).status_code == 401  # DIFFPO_API_KEY

    r = httpx.post(f"{url}/v1/refine", headers=AUTH, timeout=120, json={"items": ITEMS, **OPTS})
    assert r.status_code == 200, r.text
    assert [it["text"] for it in r.json()["items"]] == [oracle(item) for item in ITEMS]

    r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=120,
                   json={"messages": MESSAGES, "diffpo": OPTS})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["diffpo"]["refined"] is True
    assert out["choices"][0]["message"]["content"] == oracle({"messages": MESSAGES, "draft": UPSTREAM_ANSWER})


def test_diffpo_refiner_refines_through_the_serve_endpoint(cluster, oracle):
    from diffpo_sdk import DiffPORefiner

    refiner = DiffPORefiner(endpoint=cluster["url"], api_key=API_KEY, timeout=120, fail_open=False, **OPTS)
    assert refiner.batch(ITEMS[:3]) == [oracle(item) for item in ITEMS[:3]]


def test_each_replica_exports_its_metrics_to_one_scrape(cluster):
    """Ray's metrics agent serves every replica's ``diffpo_*`` samples, tagged by replica."""
    def refine(item: dict[str, Any]) -> int:
        return httpx.post(f"{cluster['url']}/v1/refine", headers=AUTH, timeout=120,
                          json={"items": [item], **OPTS}).status_code

    def replicas_seen() -> set[str]:
        text = httpx.get(cluster["metrics"], timeout=10).text
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_diffpo_requests_total{")]
        return {part.split('"')[1] for ln in lines for part in ln.split(",") if part.startswith("replica=")}

    # Serve's router may send sequential requests all to one idle replica (seen in CI: 10 of 10),
    # so while a replica is missing from the scrape, each try sends a concurrent burst, which the
    # router spreads by queue length
    seen: set[str] = set()

    def both_replicas_exported() -> bool:
        seen.update(replicas_seen())
        if len(seen) == 2:
            return True
        with ThreadPoolExecutor(len(ITEMS)) as pool:
            assert list(pool.map(refine, ITEMS)) == [200] * len(ITEMS)
        return False

    try:
        wait_for("both replicas' diffpo metrics in the Ray scrape", both_replicas_exported, timeout=120, every=1.0)
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}; replicas in the scrape: {sorted(seen)}") from None


async def test_killing_a_replica_loses_no_draft_and_the_deployment_recovers(cluster, oracle):
    import ray
    from langchain_core.messages import AIMessage

    from diffpo_sdk import DiffPORefiner

    app, url = cluster["app"], cluster["url"]
    before = replica_names()
    assert len(before) == 2
    victim = ray.get_actor(before[0], namespace="serve")
    refiner = DiffPORefiner(endpoint=url, api_key=API_KEY, timeout=180, retries=3, **OPTS)
    inputs = [{"prompt": it["prompt"], "draft": AIMessage(content=it["draft"])} for it in ITEMS * 2]
    calls = [asyncio.ensure_future(refiner.ainvoke(x)) for x in inputs]

    def victim_busy() -> bool:
        return ray.get(victim.get_num_ongoing_requests.remote(), timeout=30) > 0

    await asyncio.to_thread(wait_for, "requests in flight on the victim", victim_busy, 120, 0.05)
    ray.kill(victim, no_restart=True)
    outs = await asyncio.gather(*calls)

    assert len(outs) == len(inputs)  # none lost
    refined = 0
    for x, out in zip(inputs, outs):
        meta = out.response_metadata["diffpo"]
        if meta["refined"]:
            refined += 1
            assert out.content == oracle({"prompt": x["prompt"], "draft": x["draft"].content})
        else:  # failed open: the draft itself, marked, with the reason
            assert out.content == x["draft"].content and meta.get("error")
    assert refined > 0

    wait_for("a replacement replica", lambda: before[0] not in replica_names() and running_replicas(app) == 2, timeout=300)
    assert len(set(replica_names()) - set(before)) == 1
    r = httpx.post(f"{url}/v1/refine", headers=AUTH, timeout=120, json={"items": ITEMS[:2], **OPTS})
    assert r.status_code == 200 and [it["text"] for it in r.json()["items"]] == [oracle(i) for i in ITEMS[:2]]
