"""``diffpo bench speed``: the engine against greedy ``generate`` and no-cache Jacobi, side by side.

Same model, prompts, drafts and machine in one run. Three kinds of draft:

- ``real``: answers written by other models (the shared AlpacaEval file);
- ``fixed``: the refiner's own greedy answers, i.e. drafts already at the fixed point;
- ``random``: random tokens.

Two kinds of conversation (``--conversations``): ``single`` (one user turn) and ``two-turn``
(a second user turn after a first answer of 200+ tokens, as in a chat: a long context, with
the draft written by another model than the first answer).

Reported per configuration: forward passes per token, tokens decided per pass, and the
wall-clock ratio against HF ``generate`` (above 1 is faster). Also 8 requests batched
against the same 8 one by one, and the official repository's no-cache Jacobi (whole prompt
and answer re-run every iteration) on real drafts.

``--compare-model`` puts a second refiner beside the first on the same real drafts (for
example the built-in trained ``smollm2-135m-diffpo`` beside the untrained
``smollm2-135m-instruct``): passes per token and speed of both, per block size, in one run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

from ..builtin_refiners import DIFFPO_NAME, SMOLLM2_NAME
from ..engine import RefineResult, RefinerEngine
from ..engine.row import Row
from ..engine.templating import draft_ids, prompt_ids
from ..protocol import RefineItem
from ..shared_data import ALPACA_PREFERENCES, BUNDLED_DRAFTS, shared_file

def load_prompts(path: Path | None, n: int, seed: int = 0) -> list[dict[str, str]]:
    """Real prompts with a real draft each, from the shared AlpacaEval file (or a fallback)."""
    path = path or shared_file(ALPACA_PREFERENCES)
    if path is not None and path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        rng = random.Random(seed)
        rows = rng.sample(rows, min(n, len(rows)))
        return [{"prompt": r["instruction"], "draft": rng.choice(r["responses"])["output"]} for r in rows]
    return bundled_drafts()[:n]


FOLLOW_UPS = ("Thanks. Next question: {}", "{}", "Different topic now. {}")


def load_two_turn(path: Path | None, n: int, tokenizer: Any, seed: int = 0, min_first: int = 200) -> list[dict[str, Any]]:
    """Second turns of real conversations: a user turn, a first answer of at least ``min_first``
    tokens by one model, a new user question, and another model's answer to it as the draft.
    Without the shared file, the bundled items stand in (their first answers are short)."""
    path = path or shared_file(ALPACA_PREFERENCES)
    if path is None or not path.is_file():
        items = bundled_drafts()
        singles = [it for it in items if "prompt" in it]
        return [{"messages": [{"role": "user", "content": a["prompt"]}, {"role": "assistant", "content": a["draft"]},
                              {"role": "user", "content": b["prompt"]}], "draft": b["draft"]}
                for a, b in zip(singles, singles[1:] + singles[:1])][:n]
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    rng = random.Random(seed)
    rng.shuffle(rows)
    out: list[dict[str, Any]] = []
    for first, second in zip(rows[0::2], rows[1::2]):
        longs = [r for r in first["responses"] if len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) >= min_first]
        if not longs:
            continue
        answer = rng.choice(longs)
        others = [r for r in second["responses"] if r.get("model") != answer.get("model")] or second["responses"]
        out.append({
            "messages": [{"role": "user", "content": first["instruction"]},
                         {"role": "assistant", "content": answer["output"]},
                         {"role": "user", "content": rng.choice(FOLLOW_UPS).format(second["instruction"])}],
            "draft": rng.choice(others)["output"],
        })
        if len(out) >= n:
            break
    return out


def bundled_drafts() -> list[dict[str, str]]:
    """A few prompts with deliberately plain drafts, shipped with the package."""
    path = BUNDLED_DRAFTS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def official_jacobi(engine: RefinerEngine, item: dict[str, Any], max_new_tokens: int, block_size: int) -> RefineResult:
    """The paper's repository's decoding, re-implemented as a baseline: no KV cache, the
    whole prompt and answer re-run every iteration, a block iterated until it stops changing."""
    parsed = RefineItem.model_validate(item)
    prompt = prompt_ids(engine.tokenizer, parsed.conversation())
    draft = engine.initial_guess(draft_ids(engine.tokenizer, parsed.draft), max_new_tokens)
    answer: list[int] = []
    passes = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        while len(answer) < max_new_tokens:
            end = min(len(answer) + block_size, max_new_tokens)
            block = draft[len(answer) : end]
            while True:
                ids = torch.tensor([prompt + answer + block], device=engine.device)
                logits = engine.model(input_ids=ids).logits[0]
                passes += 1
                start = len(prompt) + len(answer) - 1
                new = logits[start : start + len(block)].argmax(-1).tolist()
                if new == block:
                    break
                block = new
            stops = [k for k, t in enumerate(block) if t in engine.stop_ids]
            answer += block[: stops[0] + 1] if stops else block
            if stops:
                break
    row = Row(prompt=prompt, guess=[], answer=answer, iterations=passes, finish_reason="stop")
    return engine.result_of(row, [], time.perf_counter() - t0)


def _summarise(name: str, kind: str, results: list[RefineResult], seconds: float, hf_seconds: float,
               conversations: str = "single") -> dict[str, Any]:
    passes = sum(r.iterations for r in results)
    tokens = sum(r.new_tokens for r in results)
    return {
        "config": name,
        "drafts": kind,
        "conversations": conversations,
        "passes_per_token": round(passes / max(tokens, 1), 4),
        "tokens_per_pass": round(tokens / max(passes, 1), 3),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 2),
        "speedup_vs_generate": round(hf_seconds / max(seconds, 1e-9), 3),
    }


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def compare_refiners(engines: list[RefinerEngine], items: list[dict[str, Any]], blocks: list[Any],
                     max_new_tokens: int) -> tuple[list[dict[str, Any]], int]:
    """Each refiner on the same drafts, interleaved per prompt (a drifting machine load hits all
    alike), each against its own greedy ``generate``. Returns the rows and the outputs differing
    from that ``generate``."""
    secs = {(k, b): 0.0 for k in range(len(engines)) for b in blocks}
    results: dict[tuple[int, Any], list[RefineResult]] = {key: [] for key in secs}
    hf = [0.0] * len(engines)
    mismatches = 0
    for it in items:
        for k, engine in enumerate(engines):
            ref, s = _timed(engine.generate, it, max_new_tokens=max_new_tokens)
            hf[k] += s
            for block in blocks:
                (res,), s = _timed(engine.refine, [it], block_size=block, max_new_tokens=max_new_tokens)
                secs[k, block] += s
                results[k, block].append(res)
                mismatches += res.token_ids != ref.token_ids
    rows = [{"model": engines[k].model_name, **_summarise(f"engine block={block}", "real", results[k, block],
                                                           secs[k, block], hf[k])}
            for block in blocks for k in range(len(engines))]
    return rows, mismatches


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    torch.manual_seed(0)
    engine = RefinerEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    N = args.max_new_tokens
    data = Path(args.data) if args.data else None
    settings = [c for c in args.conversations.split(",") if c]
    if not set(settings) <= {"single", "two-turn"}:
        raise SystemExit(f"--conversations: 'single' and/or 'two-turn', got {args.conversations!r}")
    blocks = list(dict.fromkeys(N if b == "N" else int(b) for b in args.blocks.split(",")))
    kinds = args.drafts.split(",")
    batch_blocks = [b if b == "auto" else int(b) for b in args.batch_blocks.split(",") if b]
    rng = random.Random(1)
    vocab = len(engine.tokenizer)

    official_blocks = [int(b) for b in args.official_blocks.split(",") if b]
    steps = len(settings) * (1 + len(kinds) * (len(blocks) + 1)) + len(batch_blocks)
    steps += len(official_blocks) if args.official_prompts else 0
    steps += 1 if args.compare_model else 0
    progress = tqdm(total=steps, desc="bench speed")
    rows = []
    mismatches = 0
    first_drafts: dict[str, list[dict[str, Any]]] = {}
    for setting in settings:
        base = load_prompts(data, args.num_prompts) if setting == "single" else load_two_turn(
            data, args.num_prompts, engine.tokenizer)
        engine.refine(base[:1], block_size=8, max_new_tokens=8)  # warm-up
        gen, hf_s = _timed(lambda: [engine.generate(it, max_new_tokens=N) for it in base])
        progress.update(1)

        def with_draft(it: dict[str, Any], draft: str) -> dict[str, Any]:
            return {**{k: v for k, v in it.items() if k != "draft"}, "draft": draft}

        drafts = {
            "real": base,
            "fixed": [with_draft(it, r.text) for it, r in zip(base, gen)],
            "random": [with_draft(it, engine.tokenizer.decode([rng.randrange(vocab) for _ in range(N)])) for it in base],
        }
        first_drafts = first_drafts or drafts
        gen_tokens = sum(r.new_tokens for r in gen)
        rows.append({"config": "hf-generate", "drafts": "-", "conversations": setting, "passes_per_token": 1.0,
                     "tokens_per_pass": 1.0, "seconds": round(hf_s, 3), "tokens_per_s": round(gen_tokens / hf_s, 2),
                     "speedup_vs_generate": 1.0})
        # Interleaved: for every prompt, greedy generate and then each configuration run back to
        # back, so a machine whose load drifts during the run slows all of them alike.
        configs = [*blocks, "auto"]
        for kind in kinds:
            secs = dict.fromkeys(configs, 0.0)
            results: dict = {c: [] for c in configs}
            hf_kind = 0.0
            for it, g in zip(drafts[kind], gen):
                hf_kind += _timed(engine.generate, it, max_new_tokens=N)[1]
                for block in configs:
                    (res,), s = _timed(engine.refine, [it], block_size=block, max_new_tokens=N)
                    secs[block] += s
                    results[block].append(res)
                    mismatches += res.token_ids != g.token_ids
            for block in configs:
                rows.append(_summarise(f"engine block={block}", kind, results[block], secs[block], hf_kind, setting))
                progress.update(1)
    drafts = first_drafts

    # 8 requests batched against the same 8 one by one (real drafts, adaptive and block 32)
    batch_items = (drafts["real"] * 8)[:8]
    batching = {}
    for block in batch_blocks:
        one, s_one = _timed(lambda: [engine.refine([it], block_size=block, max_new_tokens=N)[0] for it in batch_items])
        many, s_many = _timed(lambda: engine.refine(batch_items, block_size=block, max_new_tokens=N))
        mismatches += sum(a.token_ids != b.token_ids for a, b in zip(one, many))
        tok = sum(r.new_tokens for r in many)
        batching[str(block)] = {
            "one_by_one_tokens_per_s": round(tok / s_one, 2),
            "batched_tokens_per_s": round(tok / s_many, 2),
            "ratio": round(s_one / s_many, 3),
        }
        progress.update(1)

    official = None
    if args.official_prompts:
        # The paper's main results decode the whole answer as one block (256); its hybrid
        # table finds block 32 fastest. Both are baselines: each ratio is printed.
        items = drafts["real"][: args.official_prompts]
        M = args.official_max_new_tokens
        ref, s_gen = _timed(lambda: [engine.generate(it, max_new_tokens=M) for it in items])
        ours, s_ours = _timed(lambda: [engine.refine([it], max_new_tokens=M)[0] for it in items])
        mismatches += sum(a.token_ids != b.token_ids for a, b in zip(ours, ref))
        official = {
            "max_new_tokens": M,
            "prompts": len(items),
            "engine_auto_seconds": round(s_ours, 3),
            "generate_seconds": round(s_gen, 3),
            "baselines": {},
        }
        for block in official_blocks:
            off, s_off = _timed(lambda b=block: [official_jacobi(engine, it, M, b) for it in items])
            mismatches += sum(a.token_ids != b.token_ids for a, b in zip(off, ref))
            official["baselines"][str(block)] = {
                "passes_per_token": round(sum(r.iterations for r in off) / max(sum(r.new_tokens for r in off), 1), 4),
                "seconds": round(s_off, 3),
                "speedup_auto_vs_official": round(s_off / s_ours, 2),
                "speedup_generate_vs_official": round(s_off / s_gen, 2),
            }
            progress.update(1)
    compare = None
    if args.compare_model:
        other = RefinerEngine.from_pretrained(args.compare_model, device=args.device, dtype=args.dtype)
        other.refine(drafts["real"][:1], block_size=8, max_new_tokens=8)  # warm-up
        compare, wrong = compare_refiners([engine, other], drafts["real"], [*blocks, "auto"], N)
        mismatches += wrong
        progress.update(1)
    progress.close()
    return {
        "machine": machine_description(engine),
        "model": engine.model_name,
        "dtype": str(engine.model.dtype),
        "max_new_tokens": N,
        "num_prompts": args.num_prompts,
        "conversations": settings,
        "rows": rows,
        "batching": batching,
        "official": official,
        "compare": compare,
        "outputs_differing_from_generate": int(mismatches),
    }


def machine_description(engine: RefinerEngine) -> str:
    if engine.device.type == "cuda":
        return f"{torch.cuda.get_device_name(engine.device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['model']} on {report['machine']} ({report['dtype']}), N={report['max_new_tokens']}, "
          f"{report['num_prompts']} prompts")
    print(f"{'config':<22}{'turns':<10}{'drafts':<8}{'passes/tok':>11}{'tok/pass':>10}{'tok/s':>9}{'vs generate':>13}")
    for r in report["rows"]:
        print(f"{r['config']:<22}{r.get('conversations', 'single'):<10}{r['drafts']:<8}{r['passes_per_token']:>11.3f}{r['tokens_per_pass']:>10.2f}"
              f"{r['tokens_per_s']:>9.1f}{r['speedup_vs_generate']:>12.2f}x")
    for block, b in report["batching"].items():
        print(f"8 batched vs one by one (block={block}): {b['batched_tokens_per_s']} vs "
              f"{b['one_by_one_tokens_per_s']} tok/s = {b['ratio']}x")
    if report["official"]:
        o = report["official"]
        for block, b in o["baselines"].items():
            print(f"no-cache official Jacobi (block {block}, N={o['max_new_tokens']}, real drafts, {o['prompts']} prompts): "
                  f"{b['seconds']} s; engine auto {o['engine_auto_seconds']} s = {b['speedup_auto_vs_official']}x faster "
                  f"(generate {b['speedup_generate_vs_official']}x)")
    if report.get("compare"):
        rows = report["compare"]
        width = max(len(r["model"]) for r in rows) + 2
        print(f"\nrefiners side by side on the same real drafts ({report['num_prompts']} prompts, "
              f"N={report['max_new_tokens']}), each against its own greedy generate:")
        print(f"{'config':<22}{'refiner':<{width}}{'passes/tok':>11}{'tok/pass':>10}{'tok/s':>9}{'vs generate':>13}")
        for r in rows:
            print(f"{r['config']:<22}{r['model']:<{width}}{r['passes_per_token']:>11.3f}{r['tokens_per_pass']:>10.2f}"
                  f"{r['tokens_per_s']:>9.1f}{r['speedup_vs_generate']:>12.2f}x")
    print(f"outputs differing from greedy generate: {report['outputs_differing_from_generate']}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine_rows = [r for r in report["rows"] if r["drafts"] != "-"]

    def label(r: dict[str, Any]) -> str:
        turns = r.get("conversations", "single")
        return r["drafts"] if turns == "single" else f"{r['drafts']}, {turns}"

    kinds = list(dict.fromkeys(label(r) for r in engine_rows))
    configs = list(dict.fromkeys(r["config"] for r in engine_rows))
    speed = {(r["config"], label(r)): r["speedup_vs_generate"] for r in engine_rows}
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        vals = [speed.get((c, kind), 0.0) for c in configs]
        ax.bar([i + k * width for i in range(len(configs))], vals, width, label=f"{kind} drafts")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + width for i in range(len(configs))], [c.replace("engine ", "") for c in configs])
    ax.set_yscale("log")
    ax.set_ylabel("speed-up vs HF generate (log)")
    ax.set_title(f"{report['model']}, N={report['max_new_tokens']}, {report['machine']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffpo bench speed", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SMOLLM2_NAME)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--blocks", default="16,32,64,128,N", help="fixed block sizes to run ('N' = max-new-tokens)")
    p.add_argument("--drafts", default="real,fixed,random", help="draft kinds to run")
    p.add_argument("--conversations", default="single",
                   help="'single', 'two-turn' (a second user turn after a 200+ token first answer) or both, comma-separated")
    p.add_argument("--batch-blocks", default="auto,32", help="block sizes for the 8-batched comparison ('' skips)")
    p.add_argument("--official-prompts", type=int, default=2, help="prompts for the no-cache baseline (0 skips it)")
    p.add_argument("--official-max-new-tokens", type=int, default=256)
    p.add_argument("--official-blocks", default="32,256",
                   help="block sizes of the no-cache baseline: the paper's fastest hybrid (32) and its main setting (256)")
    p.add_argument("--compare-model", default=None,
                   help=f"a second refiner to run beside --model on the same real drafts, e.g. {DIFFPO_NAME}")
    p.add_argument("--data", default=None, help="AlpacaEval-format .jsonl.gz (default: ../shared/data)")
    p.add_argument("--out", default="bench-out/speed.json")
    p.add_argument("--plot", default="bench-out/speed.png")
    args = p.parse_args(argv)
    report = run(args)
    print_report(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, Path(args.plot))
    print(f"wrote {out}" + (f" and {args.plot}" if args.plot else ""))
    return 0
