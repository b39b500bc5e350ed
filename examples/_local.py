"""Shared set-up for the examples: a real local LLM behind LiteLLM, so they run offline.

Every example drafts with ``local/smollm2-135m-instruct`` (SmolLM2-135M-Instruct, sampled,
through a LiteLLM custom provider; see ``diffpo_sdk.apps.local_llm``). To use your own model,
drop the ``register_local_llm()`` call and pass a LiteLLM model id such as
``openai/gpt-4o-mini`` instead of ``LOCAL_MODEL``.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM: no cost-map download at import
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LOCAL_MODEL = "local/smollm2-135m-instruct"
#: the refiner every example uses: the built-in model, run in this process on the CPU
REFINER = {"model": "smollm2-135m-instruct", "device": "cpu", "dtype": "float32"}


def register_local_llm() -> None:
    """Make ``litellm.completion(model=LOCAL_MODEL)`` answer with the local model."""
    from diffpo_sdk.apps.local_llm import register

    register("local", device="cpu", dtype="float32")
