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


LONG_DRAFT = (
    "Photosynthesis is the process plants use to turn light into chemical energy. Chlorophyll in the "
    "leaves absorbs mostly red and blue light, which drives the splitting of water and releases oxygen. "
)

#: Items written for the tests, so exactness checks need no shared data: drafts that disagree
#: with any refiner in wording, order and length, multi-byte text, several turns, an empty
#: draft and a draft far longer than the budget.
ORACLE_ITEMS: list[dict] = [
    {"prompt": "Describe how a bicycle gear system works, for a curious twelve-year-old.",
     "draft": "A bicycle has gears so you can pedal easier uphill. The chain moves between cogs of different "
              "sizes at the back and the front. A big cog at the back makes pedalling light but slow; a small "
              "one makes it heavy but fast. The derailleur pushes the chain from one cog to the next."},
    {"prompt": "List five fruits that are high in vitamin C and say one fact about each.",
     "draft": "1. Oranges - the classic source.\n2. Kiwi - has more than an orange by weight.\n3. Strawberries - "
              "also rich in fibre.\n4. Guava - one of the richest.\n5. Papaya - good for digestion too."},
    {"prompt": "Translate 'good morning, how are you?' into French, Spanish and Japanese.",
     "draft": "French: Bonjour, comment ça va ?\nSpanish: Buenos días, ¿cómo estás?\nJapanese: おはようございます、お元気ですか？"},
    {"prompt": "Write a haiku about the sea at night.", "draft": "Dark waves fold and break / the moon drowns "
     "in silver foam / a gull sleeps on wind"},
    {"prompt": "What are the main differences between TCP and UDP?",
     "draft": "UDP is faster but unreliable, TCP is reliable. TCP does handshakes and retransmits lost packets, "
              "UDP just sends datagrams. Video calls and games often use UDP; web pages and email use TCP."},
    {"prompt": "Give me a recipe for a simple tomato soup.",
     "draft": "Ingredients: 6 tomatoes, 1 onion, 2 cloves garlic, olive oil, salt, 500 ml stock.\n\nSteps:\n\n"
              "1. Chop the onion and garlic and fry them gently.\n\n2. Add the chopped tomatoes and the stock.\n\n"
              "3. Simmer 20 minutes, blend, season. 🍅 Enjoy!"},
    {"prompt": "Explain recursion to a beginner programmer.", "draft": ""},
    {"prompt": "Summarise the history of the printing press in one paragraph.", "draft": LONG_DRAFT * 6},
    {"messages": [{"role": "system", "content": "You answer in one short paragraph."},
                  {"role": "user", "content": "Why do cats purr?"},
                  {"role": "assistant", "content": "Cats purr when they are content, but also when stressed or "
                                                   "hurt; the vibration may even help healing."},
                  {"role": "user", "content": "Now say it more briefly."}],
     "draft": "In short:"},
    {"prompt": "Is it better to rent or to buy a home? Give balanced arguments.",
     "draft": "It depends. Buying builds equity but costs a down payment and upkeep; renting is flexible and "
              "cheaper up front, but rent goes up and you own nothing at the end."},
    {"prompt": "How do vaccines train the immune system?",
     "draft": "Vaccines show the immune system a harmless piece or a weakened form of a germ, so it learns to "
              "make antibodies and memory cells without getting sick."},
    {"prompt": "Name three famous composers and one work by each.",
     "draft": "Bach – the Brandenburg Concertos; Mozart – Die Zauberflöte; Dvořák – the New World Symphony."},
]
