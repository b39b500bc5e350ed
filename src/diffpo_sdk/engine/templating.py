"""Turning a conversation and a draft into token ids with the refiner's own chat template."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequestError

#: End-of-turn markers of common chat templates; those the template uses become stop tokens.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def stop_token_ids(tokenizer: Any, model_config: Any = None, generation_config: Any = None) -> set[int]:
    """EOS ids (tokenizer, config, generation config) plus the template's end-of-turn tokens."""
    ids: set[int] = set()
    for src in (tokenizer, model_config, generation_config):
        eos = getattr(src, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN_MARKERS:
        if marker in template and marker in vocab:
            ids.add(vocab[marker])
    if not ids:
        raise InvalidRequestError("the refiner's tokenizer defines no EOS or end-of-turn token to stop on")
    return ids


def ensure_pad_token(tokenizer: Any) -> int:
    """Tokenizers without a pad token (Llama-3) pad with EOS; padding is always masked anyway."""
    if tokenizer.pad_token_id is None:
        eos = tokenizer.eos_token_id
        tokenizer.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return int(tokenizer.pad_token_id)


def prompt_ids(tokenizer: Any, conversation: list[dict[str, str]]) -> list[int]:
    """Chat-template the conversation with the generation prompt added.

    Templates that reject a system turn (Gemma's) get it folded into the first user turn,
    which is what those models were trained to see.
    """
    for msg in conversation:
        if msg.get("role") not in ("system", "user", "assistant"):
            raise InvalidRequestError(f"unknown role {msg.get('role')!r}: use 'system', 'user' or 'assistant'")
    if not conversation or conversation[-1]["role"] != "user":
        raise InvalidRequestError("the last turn must be a user turn: the draft is the answer to it")
    if getattr(tokenizer, "chat_template", None) is None:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in conversation) + "assistant: "
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    try:
        return _apply(tokenizer, conversation)
    except Exception as e:  # jinja2 raises TemplateError for unsupported roles
        if conversation[0]["role"] != "system" or len(conversation) < 2:
            raise InvalidRequestError(f"the refiner's chat template rejected the conversation: {e}") from e
        system, first, *rest = conversation
        merged = {"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}
        return _apply(tokenizer, [merged, *rest])


def _apply(tokenizer: Any, conversation: list[dict[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # BatchEncoding in newer transformers
        out = out["input_ids"]
    return [int(t) for t in out]


def draft_ids(tokenizer: Any, draft: str) -> list[int]:
    """The draft as answer tokens, with no special tokens added."""
    return [int(t) for t in tokenizer(draft, add_special_tokens=False)["input_ids"]]
