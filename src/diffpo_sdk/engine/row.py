"""One item being decoded: its prompt, its committed answer and its guesses for the rest."""

from __future__ import annotations

from dataclasses import dataclass, field

from .alignment import Draft


@dataclass
class Row:
    """``guess[i]`` is the current guess for answer position i (the Jacobi iterate);
    ``answer`` the verified prefix, which never changes again."""

    prompt: list[int]
    guess: list[int]
    draft: Draft = field(default_factory=lambda: Draft([]))
    answer: list[int] = field(default_factory=list)
    iterations: int = 0
    converged: bool = True
    finish_reason: str | None = None
    # passes spent in the current capped block, and which block that is
    block_index: int = 0
    block_passes: int = 0
    # running estimate of P(guess is right | prefix is right), for the adaptive policy
    hits: float = 1.0
    trials: float = 2.0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def acceptance(self) -> float:
        return self.hits / self.trials

    def observe(self, hits: int, trials: int, decay: float = 0.85) -> None:
        """Recent passes weigh more: a refiner can stop and start copying its draft."""
        if trials:
            self.hits = self.hits * decay**trials + hits
            self.trials = self.trials * decay**trials + trials
