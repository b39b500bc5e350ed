"""Keeping a draft in step with the answer, so positional guesses keep hitting.

A draft arrives as text, and text does not always tokenize back to the tokens a model
writes; a refiner also inserts or drops a few words. Either shifts every later draft token,
and guesses taken at the same positions would all miss. Two cheap repairs run after a miss:
re-tokenization and re-alignment. They only ever change guesses, which are always checked,
so they change speed, never the answer.
"""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence
from typing import Any


class Spelling:
    """Each token's text as its tokenizer writes it, and back; shared by every row."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = list(tokens)
        self.ids = {t: i for i, t in reversed(list(enumerate(self.tokens)))}

    @classmethod
    def of(cls, tokenizer: Any) -> Spelling:
        return cls(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))

    def __len__(self) -> int:
        return len(self.tokens)


class Draft:
    """One row's draft tokens and where they are believed to line up with its answer."""

    def __init__(self, tokens: Sequence[int], spelling: Spelling | None = None, max_rewrites: int = 8) -> None:
        self.tokens = list(tokens)
        self.spelling = spelling
        self.cursor = 0  # draft index believed to line up with the next answer position
        self.rewrites = 0
        self.max_rewrites = max_rewrites
        self._ngrams: dict[tuple[int, ...], list[int]] | None = None

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def advance(self, n: int) -> None:
        """``n`` answer tokens were committed: the draft position moves with them."""
        self.cursor += n

    def realign(self, answer: Sequence[int], guess: MutableSequence[int], limit: int) -> None:
        """After a miss, line the rest of the draft up with the answer again.

        The last committed tokens are looked up in the draft (trigram, else bigram, the match
        nearest the cursor) and the draft tokens after the match become the guesses from
        ``len(answer)`` up to ``limit``.
        """
        if self._ngrams is None:
            self._ngrams = {}
            for k in (2, 3):
                for q in range(k, len(self.tokens) + 1):
                    self._ngrams.setdefault(tuple(self.tokens[q - k : q]), []).append(q)
        c = len(answer)
        for k in (3, 2):
            hits = self._ngrams.get(tuple(answer[-k:])) if c >= k else None
            if hits:
                q = min(hits, key=lambda h: abs(h - self.cursor))
                tail = self.tokens[q : q + limit - c]
                guess[c : c + len(tail)] = tail
                self.cursor = q
                return

    def retokenize(self, token: int, missed: Sequence[int]) -> bool:
        """Learn from a miss that only differs in tokenization, and fix the rest of the draft.

        A byte-level BPE tokenizer splits "\\n\\n" before a word into two "\\n" tokens while
        models write one "\\n\\n" token. When the refiner's ``token`` spells exactly the next
        few draft tokens ``missed`` (a merge), or the start of the next draft token whose rest
        is a token itself (a split), every later occurrence in the draft is rewritten the
        refiner's way, so one pass pays for the lesson instead of one pass per occurrence.
        Returns whether the miss was such a difference.
        """
        if self.spelling is None or not missed or self.rewrites >= self.max_rewrites:
            return False
        spell, vocab = self.spelling.tokens, len(self.spelling)
        if not 0 <= token < vocab or any(not 0 <= t < vocab for t in missed):
            return False
        text, old, new = spell[token], None, None
        joined = ""
        for k, t in enumerate(missed, 1):
            joined += spell[t]
            if len(joined) >= len(text):
                if k > 1 and joined == text:
                    old, new = tuple(missed[:k]), (token,)
                break
        first = spell[missed[0]]
        if old is None and len(first) > len(text) and first.startswith(text):
            rest = self.spelling.ids.get(first[len(text) :])
            if rest is not None:
                old, new = (missed[0],), (token, rest)
        if old is None:
            return False
        out, q, shift, k = [], 0, 0, len(old)
        while q < len(self.tokens):
            if tuple(self.tokens[q : q + k]) == old:
                out.extend(new)
                if q < self.cursor:
                    shift += len(new) - k
                q += k
            else:
                out.append(self.tokens[q])
                q += 1
        self.tokens, self.cursor, self._ngrams = out, max(0, self.cursor + shift), None
        self.rewrites += 1
        return True
