"""The correctness oracle: transformers' own greedy ``generate`` on the same prompt."""

from __future__ import annotations

import torch

from diffpo_sdk.engine import RefinerEngine
from diffpo_sdk.engine.templating import draft_ids, prompt_ids
from diffpo_sdk.protocol import RefineItem


def greedy_reference(engine: RefinerEngine, item: dict, max_new_tokens: int, keep_draft_prefix: int = 0) -> list[int]:
    """``model.generate(do_sample=False)`` on the chat-templated prompt (+ kept draft prefix),
    cut at the first stop token, with the kept prefix in front (what ``refine`` returns)."""
    parsed = RefineItem.model_validate(item)
    prefix = draft_ids(engine.tokenizer, parsed.draft)[:keep_draft_prefix]
    ids = torch.tensor([prompt_ids(engine.tokenizer, parsed.conversation()) + prefix], device=engine.device)
    out = engine.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(engine.stop_ids),
        pad_token_id=engine.pad_id,
    )[0, ids.shape[1] :].tolist()
    answer = []
    for t in out:
        if t in engine.stop_ids:
            break
        answer.append(t)
    return prefix + answer
