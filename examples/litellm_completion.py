"""``diffpo_sdk.completion``: ``litellm.completion`` plus refinement, same arguments, same types.

The LLM call goes through LiteLLM (any provider); the answer comes back as a LiteLLM
``ModelResponse`` whose text is refined, with the refiner's stats in
``choices[i].message.provider_specific_fields["diffpo"]``. ``stream=True`` collects the
upstream stream (the draft), then streams the refined answer as the refiner verifies it.

    python examples/litellm_completion.py [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse

import litellm
from _local import LOCAL_MODEL, register_local_llm

import diffpo_sdk


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args()

    register_local_llm()  # with a real provider: model="openai/gpt-4o-mini" and OPENAI_API_KEY set
    messages = [{"role": "user", "content": "Give me three tips for staying healthy."}]

    resp = diffpo_sdk.completion(model=LOCAL_MODEL, messages=messages, temperature=0.7, seed=1,
                                 max_tokens=args.max_new_tokens,
                                 block_size="auto", max_new_tokens=args.max_new_tokens)
    msg = resp.choices[0].message
    stats = msg.provider_specific_fields["diffpo"]
    print("refined:", msg.content)
    print(f"stats: refined={stats['refined']} passes={stats['iterations']} tokens={stats['new_tokens']} "
          f"usage(upstream)={resp.usage.total_tokens} tokens")

    chunks = list(diffpo_sdk.completion(model=LOCAL_MODEL, messages=messages, temperature=0.7, seed=2,
                                        max_tokens=args.max_new_tokens, stream=True,
                                        max_new_tokens=args.max_new_tokens))
    rebuilt = litellm.stream_chunk_builder(chunks, messages=messages)
    print(f"streamed: {len(chunks)} chunks ->", rebuilt.choices[0].message.content[:200].replace("\n", " "))


if __name__ == "__main__":
    main()
