"""The LiteLLM proxy hook, called exactly as the proxy calls it.

``integrations/litellm_proxy/`` holds a ready ``config.yaml`` that loads
``DiffPOProxyHook`` into ``litellm --config config.yaml``: every chat answer the proxy
returns is refined, streams included. This example runs the hook's two entry points on
real LiteLLM responses from the local LLM, without starting the proxy server:

- ``async_post_call_success_hook``: non-streaming answers;
- ``async_post_call_streaming_iterator_hook``: streams (the success hook is not called
  for them).

With no ``DIFFPO_ENDPOINT`` set, the hook refines in-process; in production point
``DIFFPO_ENDPOINT`` at ``diffpo serve`` (see the config).

    python examples/litellm_proxy_hook.py [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio

import litellm
from _local import LOCAL_MODEL, register_local_llm

from diffpo_sdk.litellm_hook import DiffPOProxyHook
from diffpo_sdk.settings import DiffPOSettings


async def run(max_new_tokens: int) -> None:
    register_local_llm()
    hook = DiffPOProxyHook(settings=DiffPOSettings(max_new_tokens=max_new_tokens))
    messages = [{"role": "user", "content": "What type of soil is suitable for cactus?"}]
    data = {"model": LOCAL_MODEL, "messages": messages}  # the request body the proxy received

    response = await litellm.acompletion(model=LOCAL_MODEL, messages=messages, temperature=0.7, seed=3,
                                         max_tokens=max_new_tokens)
    draft = response.choices[0].message.content
    refined = await hook.async_post_call_success_hook(data, None, response)
    msg = refined.choices[0].message
    print("draft:  ", draft[:200].replace("\n", " "))
    print("refined:", msg.content[:200].replace("\n", " "))
    print("diffpo: ", {k: msg.provider_specific_fields["diffpo"].get(k)
                       for k in ("refined", "iterations", "new_tokens", "converged")})

    stream = await litellm.acompletion(model=LOCAL_MODEL, messages=messages, temperature=0.7, seed=4,
                                       max_tokens=max_new_tokens, stream=True)
    chunks = [c async for c in hook.async_post_call_streaming_iterator_hook(None, stream, data)]
    text = litellm.stream_chunk_builder(chunks, messages=messages).choices[0].message.content
    print(f"stream: {len(chunks)} chunks, refined:", text[:200].replace("\n", " "))

    # a request can opt out with {"diffpo_refine": false} in its body
    raw = await litellm.acompletion(model=LOCAL_MODEL, messages=messages, max_tokens=8, seed=5)
    kept = await hook.async_post_call_success_hook({**data, "diffpo_refine": False}, None, raw)
    print("opted out, untouched:", kept.choices[0].message.content)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-new-tokens", type=int, default=96)
    asyncio.run(run(p.parse_args().max_new_tokens))


if __name__ == "__main__":
    main()
