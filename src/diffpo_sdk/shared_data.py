"""Where the project's real data lives: ``$DIFFPO_SHARED_DATA``, else ``../shared/data``.

The data sets (AlpacaEval answers of several models, HH-RLHF pairs) are too big to ship
in the package; a checkout finds them beside itself. Every tool that reads them asks here.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ALPACA_PREFERENCES", "BUNDLED_DRAFTS", "shared_data_dir", "shared_file"]

#: AlpacaEval prompts with several models' scored answers (drafts for demos and benchmarks)
ALPACA_PREFERENCES = Path("alpaca_eval") / "multi_model_preferences.jsonl.gz"

#: a few prompts with drafts shipped in the package, for when the shared data is absent
BUNDLED_DRAFTS = Path(__file__).resolve().parent / "data" / "drafts.jsonl"

_CHECKOUT = Path(__file__).resolve().parents[2]  # src/diffpo_sdk/shared_data.py -> the checkout


def shared_data_dir() -> Path | None:
    """The first of ``$DIFFPO_SHARED_DATA``, ``../shared/data`` beside the checkout or beside
    the working directory that exists, or ``None``."""
    candidates = [Path(os.environ["DIFFPO_SHARED_DATA"])] if os.environ.get("DIFFPO_SHARED_DATA") else []
    candidates += [_CHECKOUT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)


def shared_file(relative: str | Path = ALPACA_PREFERENCES) -> Path | None:
    """A file of the shared data (AlpacaEval by default), or ``None`` where it is absent."""
    base = shared_data_dir()
    path = base / relative if base is not None else None
    return path if path is not None and path.is_file() else None
