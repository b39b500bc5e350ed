"""The ``diffpo`` command: a thin dispatcher so each subcommand imports only what it needs."""

from __future__ import annotations

import importlib
import sys

#: subcommand -> (module with ``main(argv) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("diffpo_sdk.apps.demo", "draft with a local LLM through LiteLLM, refine, compare (offline)"),
    "refine": ("diffpo_sdk.engine.cli", "refine a JSONL file of drafts with a local refiner"),
    "serve": ("diffpo_sdk.server.__main__", "run the HTTP refiner server"),
    "bench": ("diffpo_sdk.bench.__main__", "benchmarks: speed | serve | client | train"),
    "train": ("diffpo_sdk.train.__main__", "train a refiner (same as python -m diffpo_sdk.train)"),
    "data": ("diffpo_sdk.train.data", "build training trajectories: diffpo data build ..."),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: diffpo <command> [options]\n\ncommands:\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"diffpo: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
