"""LCEL: ``prompt | llm | DiffPORefiner()``, for any LangChain chat model.

The refiner sees the conversation the chat model received (captured from the run), not
only the AIMessage LCEL hands it, and returns an AIMessage with its stats in
``response_metadata["diffpo"]``.

    python examples/lcel_chain.py [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse

from _local import LOCAL_MODEL, register_local_llm
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from diffpo_sdk import ChatDiffPO, DiffPORefiner


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args()

    register_local_llm()
    # Any chat model works here (ChatOpenAI, ChatAnthropic, ...). This one is a plain
    # LiteLLM chat model (refine=False) on the local SmolLM2, so the example runs offline.
    llm = ChatDiffPO(model=LOCAL_MODEL, refine=False, temperature=0.7, max_tokens=args.max_new_tokens)
    prompt = ChatPromptTemplate.from_messages([
        ("system", "You are a concise assistant."),
        ("user", "{question}"),
    ])
    refiner = DiffPORefiner(block_size="auto", max_new_tokens=args.max_new_tokens)

    chain = prompt | llm | refiner
    answer = chain.invoke({"question": "What causes the northern lights?"})
    stats = answer.response_metadata["diffpo"]
    print("refined:", answer.content)
    print(f"stats: refined={stats['refined']} prompt={stats['prompt']} passes={stats['iterations']} "
          f"tokens={stats['new_tokens']} converged={stats['converged']}")

    # Strings work too: str in, str out. batch() sends all drafts in one refinement call.
    text_chain = prompt | llm | StrOutputParser() | refiner
    for out in text_chain.batch([{"question": "How do I wrap a present neatly?"},
                                 {"question": "What is Atlantis?"}]):
        print("refined (str):", out[:200].replace("\n", " "))


if __name__ == "__main__":
    main()
