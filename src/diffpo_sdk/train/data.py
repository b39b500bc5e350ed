"""Training trajectories (paper 2.5): for each prompt, T scored answers -> the best is the target.

One JSONL line per prompt::

    {"id": ..., "messages": [{"role": "user", "content": ...}, ...],
     "target": "best answer", "others": ["worst", ..., "second best"], "scores": [s_worst, ..., s_best]}

``scores`` is ascending and aligned with ``others + [target]``. Three sources:

- ``--from-scored``: grouped scored answers (the shared AlpacaEval file's format);
- ``--from-pairs``: HH-RLHF transcripts (chosen/rejected -> a two-step trajectory);
- ``--prompts --models --scorer``: live answers from LiteLLM models, scored by a plugin.

Bad rows raise :class:`DataError` naming file and line, or are skipped and counted with
``skip_invalid=True``; nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad input row; the message names the file and line."""


@dataclass
class BuildStats:
    """What a builder read, wrote and skipped (printed at the end of ``diffpo data build``)."""

    read: int = 0
    written: int = 0
    skipped: int = 0
    dropped_answers: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def summary(self) -> str:
        out = f"read {self.read} rows, wrote {self.written}, skipped {self.skipped} invalid"
        if self.reasons:
            out += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) + ")"
        if self.dropped_answers:
            out += f"; dropped {self.dropped_answers} empty or unscored answers inside valid rows"
        return out


def open_text(path: str | Path):
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; bad JSON raises DataError with file:line."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e


def make_record(messages: list[dict[str, str]], scored: list[tuple[str, float]], id_: Any = None) -> dict[str, Any]:
    """Sort answers by score: the best is the target, the rest are ``others``, lowest first."""
    ranked = sorted(scored, key=lambda a: a[1])  # stable: ties keep input order
    rec: dict[str, Any] = {"messages": messages, "target": ranked[-1][0], "others": [a for a, _ in ranked[:-1]],
                           "scores": [float(s) for _, s in ranked]}
    if id_ is not None:
        rec = {"id": id_, **rec}
    return rec


def validate_record(rec: Any) -> dict[str, Any]:
    """Check one trajectory record (what the trainer reads); raise ValueError with the reason."""
    if not isinstance(rec, dict):
        raise ValueError("a row must be a JSON object")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"bad message {str(m)[:80]!r}: need role in {ROLES} and string content")
    if msgs[-1]["role"] != "user":
        raise ValueError("the last message must be a user turn (the answers reply to it)")
    if not isinstance(rec.get("target"), str) or not rec["target"].strip():
        raise ValueError("'target' must be a non-empty string")
    others = rec.get("others", [])
    if not isinstance(others, list) or not all(isinstance(o, str) for o in others):
        raise ValueError("'others' must be a list of strings")
    return rec


def load_trajectories(path: str | Path, skip_invalid: bool = False, stats: BuildStats | None = None) -> list[dict]:
    """Read a trajectories JSONL file (as written by ``diffpo data build``) with file:line errors."""
    stats = stats or BuildStats()
    out = []
    for lineno, rec in read_jsonl(path):
        stats.read += 1
        try:
            out.append(validate_record(rec))
        except ValueError as e:
            if not skip_invalid:
                raise DataError(f"{path}:{lineno}: {e}") from e
            stats.skip(str(e).split(":")[0][:60])
    return out


# --------------------------------------------------------------------------- scored answers


def from_scored(path: str | Path, skip_invalid: bool = False, stats: BuildStats | None = None) -> Iterator[dict]:
    """Grouped scored answers: ``{instruction | prompt | messages, responses: [{output, preference|score}]}``.

    Answers with empty text or no score are dropped (and counted); a prompt needs at least
    two usable answers to form a trajectory.
    """
    stats = stats or BuildStats()
    for lineno, row in read_jsonl(path):
        stats.read += 1
        try:
            messages = _messages_of(row)
            answers = row.get("responses")
            if not isinstance(answers, list):
                raise ValueError("'responses' must be a list of {output, preference} objects")
            scored = []
            for a in answers:
                text = a.get("output", a.get("text")) if isinstance(a, dict) else None
                score = a.get("preference", a.get("score")) if isinstance(a, dict) else None
                if not isinstance(text, str) or not text.strip() or not isinstance(score, (int, float)):
                    stats.dropped_answers += 1
                    continue
                scored.append((text, float(score)))
            if len(scored) < 2:
                raise ValueError(f"needs at least 2 non-empty scored answers, has {len(scored)}")
        except (ValueError, AttributeError) as e:
            if not skip_invalid:
                raise DataError(f"{path}:{lineno}: {e}") from e
            stats.skip(str(e).split(",")[0][:60])
            continue
        stats.written += 1
        yield make_record(messages, scored, row.get("id"))


def _messages_of(row: dict) -> list[dict[str, str]]:
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    if "messages" in row:
        return validate_record({"messages": row["messages"], "target": "x"})["messages"]
    text = row.get("instruction", row.get("prompt"))
    if not isinstance(text, str) or not text.strip():
        raise ValueError("needs a non-empty 'instruction', 'prompt' or 'messages'")
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- preference pairs

_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_transcript(text: str) -> list[dict[str, str]]:
    """``\\n\\nHuman: ...\\n\\nAssistant: ...`` -> chat messages (the HH-RLHF transcript format)."""
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH-RLHF transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def from_pairs(path: str | Path, skip_invalid: bool = False, stats: BuildStats | None = None) -> Iterator[dict]:
    """Chosen/rejected transcripts sharing all turns but the last -> a two-step trajectory."""
    stats = stats or BuildStats()
    for lineno, row in read_jsonl(path):
        stats.read += 1
        try:
            if not isinstance(row, dict) or not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
                raise ValueError("needs string fields 'chosen' and 'rejected'")
            chosen, rejected = parse_transcript(row["chosen"]), parse_transcript(row["rejected"])
            if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
                raise ValueError("both transcripts must end with an Assistant turn")
            if chosen[:-1] != rejected[:-1]:
                raise ValueError("chosen and rejected differ before their last Assistant turn")
            if not chosen[-1]["content"] or not rejected[-1]["content"]:
                raise ValueError("empty final Assistant answer")
            if chosen[-1]["content"] == rejected[-1]["content"]:
                raise ValueError("chosen and rejected answers are identical")
            messages = chosen[:-1]
            validate_record({"messages": messages, "target": "x"})
        except ValueError as e:
            if not skip_invalid:
                raise DataError(f"{path}:{lineno}: {e}") from e
            stats.skip(str(e).split("(")[0].strip()[:60])
            continue
        stats.written += 1
        yield make_record(messages, [(rejected[-1]["content"], 0.0), (chosen[-1]["content"], 1.0)],
                          row.get("id", f"{Path(path).name}:{lineno}"))


# --------------------------------------------------------------------------- live generation


class AnswerCache:
    """Append-only JSONL cache of (model, prompt) -> answer, so an interrupted build resumes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self._data[row["key"]] = row["value"]
                    except (json.JSONDecodeError, KeyError):
                        continue  # a line cut by a crash: just regenerate it

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def get(self, key: str) -> Any:
        return self._data.get(key)

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "value": value}) + "\n")


def with_retries(fn: Callable[[], Any], retries: int = 3, base_delay: float = 1.0) -> Any:
    """Call ``fn`` with exponential backoff; the last error propagates."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception:
            if attempt == retries:
                raise
            time.sleep(base_delay * 2**attempt)


def litellm_answer(model: str, messages: list[dict], max_tokens: int = 512, temperature: float = 0.7) -> str:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    resp = litellm.completion(model=model, messages=messages, max_tokens=max_tokens, temperature=temperature)
    return resp.choices[0].message.content or ""


def generate_answers(prompts: list[dict], models: list[str], cache: AnswerCache, concurrency: int = 8,
                     retries: int = 3, max_tokens: int = 512,
                     answer_fn: Callable[[str, list[dict]], str] | None = None) -> list[dict[str, str]]:
    """Every model answers every prompt, concurrently, cached; a failed call is recorded as missing."""
    from tqdm.auto import tqdm

    answer_fn = answer_fn or (lambda m, msgs: litellm_answer(m, msgs, max_tokens=max_tokens))
    out: list[dict[str, str]] = [{} for _ in prompts]
    jobs = [(i, m) for i in range(len(prompts)) for m in models]

    def one(job: tuple[int, str]) -> None:
        i, model = job
        key = cache.key("answer", model, prompts[i]["messages"], max_tokens)
        text = cache.get(key)
        if text is None:
            try:
                text = with_retries(lambda: answer_fn(model, prompts[i]["messages"]), retries)
            except Exception as e:  # counted by the caller as a missing answer
                print(f"warning: {model} failed on prompt {i}: {e}", file=sys.stderr)
                return
            cache.put(key, text)
        out[i][model] = text

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(tqdm(pool.map(one, jobs), total=len(jobs), desc="answers", unit="call"))
    # model order, not completion order, so ties rank the same on every run
    return [{m: ans[m] for m in models if m in ans} for ans in out]


Scorer = Callable[[list[dict], list[str]], list[float]]


def make_scorer(spec: str, cache: AnswerCache | None = None, trust_remote_code: bool = False) -> Scorer | None:
    """``precomputed`` (None: scores come with the prompts), ``reward-model:PATH`` or ``judge:MODEL``.

    ``trust_remote_code`` lets a reward model run the code shipped with it (the paper's ArmoRM
    needs it); it is off unless asked for, as in transformers.
    """
    if spec == "precomputed":
        return None
    kind, _, arg = spec.partition(":")
    if kind == "reward-model" and arg:
        return RewardModelScorer(arg, trust_remote_code=trust_remote_code)
    if kind == "judge" and arg:
        return JudgeScorer(arg, cache)
    raise DataError(f"unknown scorer {spec!r}: use precomputed, reward-model:PATH or judge:MODEL")


class RewardModelScorer:
    """Score with an ``AutoModelForSequenceClassification`` reward model (first logit), chat-templated."""

    def __init__(self, path: str, device: str = "auto", trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..engine.loading import resolve_device

        self.device = resolve_device(device)
        self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=trust_remote_code).to(self.device).eval()
        self.torch = torch

    def __call__(self, messages: list[dict], answers: list[str]) -> list[float]:
        scores = []
        for a in answers:
            conv = [*messages, {"role": "assistant", "content": a}]
            if getattr(self.tok, "chat_template", None):
                text = self.tok.apply_chat_template(conv, tokenize=False)
            else:
                text = "".join(f"{m['role']}: {m['content']}\n" for m in conv)
            enc = self.tok(text, return_tensors="pt", truncation=True, max_length=4096).to(self.device)
            with self.torch.no_grad():
                scores.append(float(self.model(**enc).logits[0, 0]))
        return scores


class JudgeScorer:
    """An LLM judge through LiteLLM rates each answer 1-10 (cached; unparseable ratings raise)."""

    PROMPT = ("Rate how helpful, harmless and well-written the assistant's answer is, from 1 (worst) to 10 "
              "(best). Reply with the number only.\n\n[Conversation]\n{conv}\n\n[Answer]\n{answer}")

    def __init__(self, model: str, cache: AnswerCache | None = None, answer_fn: Callable | None = None):
        self.model, self.cache = model, cache
        self.answer_fn = answer_fn or (lambda m, msgs: litellm_answer(m, msgs, max_tokens=8, temperature=0.0))

    def __call__(self, messages: list[dict], answers: list[str]) -> list[float]:
        conv = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        out = []
        for a in answers:
            key = AnswerCache.key("judge", self.model, messages, a)
            val = self.cache.get(key) if self.cache else None
            if val is None:
                reply = with_retries(lambda: self.answer_fn(self.model, [
                    {"role": "user", "content": self.PROMPT.format(conv=conv, answer=a)}]))
                m = re.search(r"\d+(\.\d+)?", reply or "")
                if not m:
                    raise ValueError(f"judge {self.model} gave no rating: {reply!r}")
                val = float(m.group())
                if self.cache:
                    self.cache.put(key, val)
            out.append(val)
        return out


def from_live(prompts_path: str | Path, models: list[str], scorer: str, cache_path: str | Path,
              concurrency: int = 8, retries: int = 3, max_tokens: int = 512, skip_invalid: bool = False,
              stats: BuildStats | None = None, answer_fn: Callable | None = None,
              trust_remote_code: bool = False) -> Iterator[dict]:
    """Prompts JSONL (``prompt | instruction | messages``, optional ``id``) -> answers -> scores -> records.

    With ``--scorer precomputed`` each prompt row carries ``responses`` with scores already;
    new model answers could not be scored, so asking for ``models`` then is an error (raised
    before any model is called).
    """
    if scorer == "precomputed" and models:
        raise DataError("--scorer precomputed scores only the answers the prompt rows carry; answers from "
                        "--models would have no score: score them with reward-model:PATH or judge:MODEL")
    stats = stats or BuildStats()
    prompts = []
    for lineno, row in read_jsonl(prompts_path):
        stats.read += 1
        try:
            prompts.append({"messages": _messages_of(row), "id": row.get("id"), "row": row, "line": lineno})
        except ValueError as e:
            if not skip_invalid:
                raise DataError(f"{prompts_path}:{lineno}: {e}") from e
            stats.skip(str(e)[:60])
    cache = AnswerCache(cache_path)
    score_fn = make_scorer(scorer, cache, trust_remote_code)
    answers = generate_answers(prompts, models, cache, concurrency, retries, max_tokens, answer_fn) if models else [
        {} for _ in prompts]
    for p, ans in zip(prompts, answers):
        try:
            if score_fn is None:
                given = {r.get("generator", f"r{j}"): (r.get("output"), r.get("preference", r.get("score")))
                         for j, r in enumerate(p["row"].get("responses", []))}
                scored = [(t, float(s)) for t, s in given.values() if isinstance(t, str) and t.strip()
                          and isinstance(s, (int, float))]
            else:
                texts = [t for t in ans.values() if t.strip()]
                scored = list(zip(texts, score_fn(p["messages"], texts)))
            if len(scored) < 2:
                raise ValueError(f"needs at least 2 scored answers, got {len(scored)}")
        except ValueError as e:
            if not skip_invalid:
                raise DataError(f"{prompts_path}:{p['line']}: {e}") from e
            stats.skip(str(e)[:60])
            continue
        stats.written += 1
        yield make_record(p["messages"], scored, p["id"])


# --------------------------------------------------------------------------- CLI


def write_jsonl(records: Iterable[dict], path: str | Path) -> int:
    """Write atomically (temp file + rename) so a crash never leaves half a training file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffpo data build", description="Build DiffPO training trajectories (JSONL).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-scored", "--from_scored", metavar="PATH", help="grouped scored answers (AlpacaEval format)")
    src.add_argument("--from-pairs", "--from_pairs", metavar="PATH", help="HH-RLHF chosen/rejected transcripts")
    src.add_argument("--prompts", metavar="PATH", help="prompts JSONL for live generation through LiteLLM")
    p.add_argument("--models", default="", help="comma-separated LiteLLM model names (with --prompts)")
    p.add_argument("--scorer", default="precomputed", help="precomputed | reward-model:PATH | judge:MODEL")
    p.add_argument("--trust-remote-code", "--trust_remote_code", action="store_true",
                   help="let a reward-model: scorer run the code its repository ships (ArmoRM needs it)")
    p.add_argument("--cache", default=None, help="answer cache for resuming (default: OUTPUT.cache.jsonl)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--max-tokens", "--max_tokens", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="keep only the first N trajectories")
    p.add_argument("--skip-invalid", "--skip_invalid", action="store_true", help="skip and count bad rows instead of failing")
    p.add_argument("--output", "-o", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "build":
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        print(f"diffpo data: unknown subcommand {argv[0]!r}; use: diffpo data build ...", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    stats = BuildStats()
    if args.from_scored:
        records: Iterable[dict] = from_scored(args.from_scored, args.skip_invalid, stats)
    elif args.from_pairs:
        records = from_pairs(args.from_pairs, args.skip_invalid, stats)
    else:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models and args.scorer != "precomputed":
            print("diffpo data build: --prompts needs --models (or --scorer precomputed with responses)", file=sys.stderr)
            return 2
        if models and args.scorer == "precomputed":
            print("diffpo data build: --scorer precomputed cannot score answers from --models; use "
                  "--scorer reward-model:PATH or judge:MODEL, or drop --models", file=sys.stderr)
            return 2
        records = from_live(args.prompts, models, args.scorer, args.cache or f"{args.output}.cache.jsonl",
                            args.concurrency, args.retries, args.max_tokens, args.skip_invalid, stats,
                            trust_remote_code=args.trust_remote_code)
    if args.limit is not None:
        records = itertools.islice(records, args.limit)
    try:
        n = stats.written = write_jsonl(records, args.output)
    except DataError as e:
        print(f"diffpo data build: {e}\n(use --skip-invalid to skip and count bad rows)", file=sys.stderr)
        return 1
    print(f"{stats.summary()} -> {n} trajectories in {args.output}", file=sys.stderr)
    return 0



if __name__ == "__main__":
    sys.exit(main())
