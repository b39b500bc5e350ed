"""``diffpo bench <speed|serve|stream|client|train|check>``."""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "speed": "diffpo_sdk.bench.speed",
    "serve": "diffpo_sdk.bench.serve",
    "stream": "diffpo_sdk.bench.stream",
    "client": "diffpo_sdk.bench.client",
    "train": "diffpo_sdk.bench.train",
    "check": "diffpo_sdk.bench.check",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUITES:
        print(f"usage: diffpo bench {{{'|'.join(SUITES)}}} [options]", file=sys.stderr)
        return 2
    return int(importlib.import_module(SUITES[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
