"""``diffpo serve`` / ``python -m diffpo_sdk.server``: load a refiner and serve it over HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from ..builtin_refiners import BUILTIN_REFINER, DIFFPO_NAME, SMOLLM2_NAME
from ..protocol import MAX_NEW_TOKENS_LIMIT
from .config import ServerConfig, check_bind


def _block_size(value: str) -> int | str:
    if value == "auto":
        return value
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("block size must be 'auto' or an integer >= 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(prog="diffpo serve", description="Serve a DiffPO refiner over HTTP.")
    p.add_argument("--model", default=BUILTIN_REFINER,
                   help=f"hub id, local folder, .gguf file or a built-in name: {SMOLLM2_NAME} (untrained), "
                        f"{DIFFPO_NAME} (trained adapter); default {BUILTIN_REFINER}")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder to put on the model")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own choice; 1 is faster on a CPU shared with other jobs)")
    p.add_argument("--host", default=d.host, help="interface to bind (default loopback; any other needs --api-key)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-key", default=os.environ.get("DIFFPO_API_KEY"),
                   help="Bearer token clients must send (default: $DIFFPO_API_KEY; prefer the env var, argv is visible to ps)")
    p.add_argument("--max-batch-items", type=int, default=d.max_batch_items, help="most items decoding at once in the engine batch; requests join as others finish")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a batch waits for company")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before 429")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="per-request deadline, seconds")
    p.add_argument("--default-block-size", type=_block_size, default=d.default_block_size)
    p.add_argument("--default-max-new-tokens", type=int, default=d.default_max_new_tokens)
    p.add_argument("--max-new-tokens-limit", type=int, default=d.max_new_tokens_limit,
                   help=f"cap on a request's max_new_tokens (<= {MAX_NEW_TOKENS_LIMIT})")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--upstream-model", default=None, help="LiteLLM model for /v1/chat/completions requests that name none")
    p.add_argument("--upstream-api-base", default=None, help="base URL of an OpenAI-compatible upstream")
    p.add_argument("--upstream-timeout", type=float, default=d.upstream_timeout)
    p.add_argument("--log-content", action="store_true", help="log prompts and answers (off by default)")
    p.add_argument("--log-level", default="info")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key or None,
        max_batch_items=args.max_batch_items, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        request_timeout=args.request_timeout, default_block_size=args.default_block_size,
        default_max_new_tokens=args.default_max_new_tokens,
        max_new_tokens_limit=min(args.max_new_tokens_limit, MAX_NEW_TOKENS_LIMIT),
        max_body_bytes=args.max_body_bytes, upstream_model=args.upstream_model,
        upstream_api_base=args.upstream_api_base, upstream_timeout=args.upstream_timeout,
        log_content=args.log_content,
    )


def engine_loader(args: argparse.Namespace) -> Callable[[], Any]:
    """The zero-argument loader ``create_app`` runs in the background (also each Ray Serve replica's)."""

    def load() -> Any:
        from ..engine import RefinerEngine

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)

        return RefinerEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter)

    return load


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    try:
        check_bind(config)
    except ValueError as e:
        print(f"diffpo serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the stable HTTP span and metric names (http.request.method, ...) unless the operator says otherwise
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")

    import uvicorn

    from .app import create_app
    from .telemetry import configure_from_env

    configure_from_env()

    app = create_app(engine_loader(args), config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
