"""A shipped refiner's model card, written only from what was measured, so a rebuild keeps it true.

The card compares the refiner that ships with its base model, from one ``eval_results.json``
whose ``after`` column measured that very refiner: the last training run's own table when the
refiner is exactly what that run made (``train.stack`` of LoRA stages), or a
``train.measure`` table when it was changed after training (``train.extract`` of a full
fine-tune). Every training run that made it follows with its own table.

    python -m diffpo_sdk.train.card OUT --name smollm2-135m-diffpo --measured runs/measured \\
        --runs runs/sft runs/sft-fast --command "bash scripts/build-builtin-refiner.sh"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .evaluate import LABELS, format_table, read_results

LOOP_TOLERANCE = 0.05  # a rise in long-answer repetition the card reports (the built-in's guard tolerance)
MINUS = "\u2212"


def refiner_card(name: str, base: str, made: str, measured: str | Path, runs: list[str | Path],
                 command: str | None = None) -> str:
    """The card of refiner ``name`` on ``base``; ``made`` says in a phrase how the runs became it.

    The base column is ``measured``'s own (``--eval-base-model``), else the first run's "before"
    when it ran at the measured block size. A rise of repeated 3-grams in longer answers is said."""
    final = read_results(measured)
    tables = [read_results(p) for p in runs]
    lines = ["---", f"base_model: {base}", "library_name: peft", "tags: [diffpo, refiner]", "---", "",
             f"# {name}", "", f"A DiffPO refiner: {made}. Load it with "
             f'`RefinerEngine.from_pretrained("{name}")`.']
    if command:
        lines += ["", f"Built by `{command}`."]
    final_cols = final["columns"]["after"]
    base_cols = final["columns"].get("base")
    if base_cols is None and tables and tables[0].get("block_size") == final.get("block_size"):
        base_cols = tables[0]["columns"]["before"]
    if base_cols is not None:
        lines += ["", f"## Against the base model (block size N = {final.get('block_size')})", "",
                  f"| measure | base | {name} | change |", "|---|---:|---:|---:|"]
        for key, label in LABELS.items():
            if key in base_cols and key in final_cols:
                b, a = base_cols[key], final_cols[key]
                change = f"{(a - b) / b:+.1%}" if key.startswith("passes_per_token") and b else f"{a - b:+.3f}"
                lines.append(f"| {label} | {b:.3f} | {a:.3f} | {change.replace('-', MINUS)} |")
        lines += ["", "On the held-out prompts of the runs' data (prompts no run trained on): L_AR on their "
                  "preferred answers; passes/token refining their lower-ranked answers as drafts (1.0: one "
                  "token per pass) and, for \"another source\", the drafts of `--transfer-eval-data`, a "
                  "source no run trained on; preference accuracy: how often the preferred answer scores "
                  "above a lower-ranked one. The refiner's output equals greedy decoding of base plus adapter."]
        longs = (base_cols.get("repetition_long"), final_cols.get("repetition_long"))
        if None not in longs and longs[1] - longs[0] > LOOP_TOLERANCE:
            lines += ["", f"**Known limitation.** In greedy answers of {final.get('long_tokens')} tokens, "
                      f"repeated 3-grams rise from {longs[0]:.3f} (base) to {longs[1]:.3f}: past the answer "
                      "length it trained on, it loops more than its base."]
    else:
        lines += ["", f"It was measured at block size N = {final.get('block_size')} without the base "
                  f"(`--eval-base-model`), and run 1 at N = {tables[0].get('block_size') if tables else '?'}, "
                  "so this card has no comparison against the base at one block size: each run's table compares "
                  "it with the model it started from."]
    folders = [Path(p).resolve() for p in runs]
    for i, run in enumerate(tables, 1):
        guard = run.get("guard")
        stop = (f". The collapse guard fired ({guard.rstrip('.')}) and kept the last weights that passed"
                if guard else "")
        start = run.get("model", "?")
        # a run started from an earlier run's output folder is named as such, not by a path of the build machine
        earlier = next((j for j, f in enumerate(folders[: i - 1], 1) if Path(start).resolve() == f), None)
        start = f"run {earlier}'s model" if earlier else f"`{start}`"
        lines += ["", f"## Run {i}: recipe `{run.get('recipe', '?')}` from {start} (before = its starting model)", "",
                  f"{run.get('steps', '?')} steps, {run.get('train_seconds', 0):.0f} s of training on "
                  f"{run.get('device', '?')}, {run.get('date', '?')}, block size N = {run.get('block_size')}{stop}.",
                  "", format_table(run["columns"])]
    return "\n".join(lines) + "\n"


def write_card(out: str | Path, name: str, measured: str | Path, runs: list[str | Path], how: str,
               command: str | None = None) -> Path:
    """Write ``out/README.md`` for the adapter in ``out``: its rank and base from its own
    config, ``how`` the runs became it (a phrase), the tables from ``measured`` and ``runs``."""
    out = Path(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path", "?")
    embedding = (cfg.get("rank_pattern") or {}).get("embed_tokens")
    tied = ", tied to the output head" if cfg.get("ensure_weight_tying") else ""
    also = f" (and rank {embedding} on the token embedding{tied})" if embedding else ""
    made = f"a rank-{cfg['r']} LoRA{also} on {base}, {how}"
    (out / "README.md").write_text(refiner_card(name, base, made, measured, runs, command))
    return out / "README.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffpo_sdk.train.card", description=__doc__.split("\n")[0])
    p.add_argument("out", help="the adapter folder: its README.md is written, its adapter_config.json read")
    p.add_argument("--name", required=True, help="the refiner's name, as it loads")
    p.add_argument("--measured", required=True, help="the folder of the eval_results.json that measured this refiner")
    p.add_argument("--runs", nargs="+", required=True, help="the training runs' output folders, in order")
    p.add_argument("--made", default="made by the training runs below",
                   help="how the runs became it, a phrase after 'a rank-R LoRA on BASE,'")
    p.add_argument("--command", default=None, help="the command that built it")
    args = p.parse_args(argv)
    path = write_card(args.out, args.name, args.measured, args.runs, args.made, args.command)
    print(f"model card: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
