"""Trajectory builders: the shared files, malformed input, live generation with a cache."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from diffpo_sdk.shared_data import shared_data_dir

from diffpo_sdk.train import data

SHARED = shared_data_dir() or Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = SHARED / "alpaca_eval" / "multi_model_preferences.jsonl.gz"
HH = SHARED / "hh_rlhf" / "harmless_base_pairs.jsonl.gz"


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_from_scored_on_shared_file(tmp_path: Path) -> None:
    if not ALPACA.is_file():
        pytest.skip(f"shared data not found at {ALPACA}")
    stats = data.BuildStats()
    recs = list(data.from_scored(ALPACA, stats=stats))
    assert len(recs) == stats.written == stats.read == 700
    first = json.loads(gzip.open(ALPACA, "rt").readline())
    rec = recs[0]
    best = max(first["responses"], key=lambda r: r["preference"])
    assert rec["target"] == best["output"]
    assert rec["messages"] == [{"role": "user", "content": first["instruction"]}]
    assert rec["scores"] == sorted(rec["scores"]) and len(rec["others"]) == len(rec["scores"]) - 1
    worst = min(first["responses"], key=lambda r: r["preference"])
    assert rec["others"][0] == worst["output"]
    assert stats.dropped_answers == 20  # empty answers in the file are counted, not silently lost
    for r in recs:
        data.validate_record(r)


def test_from_pairs_on_shared_file(tmp_path: Path) -> None:
    if not HH.is_file():
        pytest.skip(f"shared data not found at {HH}")
    with pytest.raises(data.DataError, match=r"harmless_base_pairs.jsonl.gz:\d+: "):
        list(data.from_pairs(HH))
    stats = data.BuildStats()
    recs = list(data.from_pairs(HH, skip_invalid=True, stats=stats))
    assert stats.read == 2000 and stats.written == len(recs) and stats.skipped == 2000 - len(recs) > 0
    assert sum(stats.reasons.values()) == stats.skipped
    row = json.loads(gzip.open(HH, "rt").readline())
    assert recs[0]["messages"][0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert recs[0]["messages"][-1]["role"] == "user"
    assert row["chosen"].endswith(recs[0]["target"]) and row["rejected"].endswith(recs[0]["others"][0])


def test_parse_transcript() -> None:
    msgs = data.parse_transcript("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: so.")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[-1]["content"] == "so."
    with pytest.raises(ValueError):
        data.parse_transcript("no transcript here")


def test_malformed_rows_name_file_and_line(tmp_path: Path) -> None:
    good = {"instruction": "q", "responses": [{"output": "a", "preference": 1.0}, {"output": "b", "preference": 2.0}]}
    bad = [
        "{not json",
        {"instruction": "q", "responses": [{"output": "a", "preference": 1.0}]},  # one answer
        {"responses": good["responses"]},  # no prompt
        {"instruction": "q", "responses": "nope"},
    ]
    for n, row in enumerate(bad):
        path = write(tmp_path / f"bad{n}.jsonl", [good, row])
        with pytest.raises(data.DataError, match=rf"bad{n}.jsonl:2: "):
            list(data.from_scored(path))
        stats = data.BuildStats()
        if n == 0:  # unparseable JSON cannot be skipped safely
            continue
        assert len(list(data.from_scored(path, skip_invalid=True, stats=stats))) == 1 and stats.skipped == 1
    pairs = write(tmp_path / "pairs.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}])
    with pytest.raises(data.DataError, match="pairs.jsonl:1: not an HH-RLHF transcript"):
        list(data.from_pairs(pairs))
    traj = write(tmp_path / "traj.jsonl", [{"messages": [{"role": "user", "content": "q"}], "target": "t", "others": []},
                                           {"messages": [{"role": "bot", "content": "q"}], "target": "t"}])
    with pytest.raises(data.DataError, match="traj.jsonl:2: bad message"):
        data.load_trajectories(traj)


def test_cli_build_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = write(tmp_path / "in.jsonl", [
        {"id": 1, "instruction": "q", "responses": [{"output": "a", "preference": 1.5}, {"output": "b", "preference": 1.2},
                                                    {"output": "c", "preference": 1.9}]},
        {"id": 2, "instruction": "", "responses": []},
    ])
    out = tmp_path / "out.jsonl"
    assert data.main(["build", "--from-scored", str(src), "--output", str(out)]) == 1
    assert "in.jsonl:2" in capsys.readouterr().err and not out.exists()
    assert data.main(["build", "--from_scored", str(src), "--output", str(out), "--skip-invalid"]) == 0
    assert "skipped 1 invalid" in capsys.readouterr().err
    rec = json.loads(out.read_text())
    assert rec == {"id": 1, "messages": [{"role": "user", "content": "q"}], "target": "c", "others": ["b", "a"],
                   "scores": [1.2, 1.5, 1.9]}
    assert data.main(["frobnicate"]) == 2


def test_live_generation_is_cached_and_resumes(tmp_path: Path) -> None:
    prompts = write(tmp_path / "prompts.jsonl", [{"id": "p1", "prompt": "hi"}, {"messages": [{"role": "user", "content": "yo"}]}])
    calls: list[tuple[str, str]] = []

    def answer(model: str, messages: list[dict]) -> str:
        calls.append((model, messages[-1]["content"]))
        if model == "flaky" and sum(c[0] == "flaky" for c in calls) == 1:
            raise RuntimeError("rate limited")  # retried
        if messages[-1]["content"].startswith("Rate"):
            return "7" if "long answer" in messages[-1]["content"] else "3"
        return f"{model} long answer" if model == "good" else f"{model} says"

    scorer_calls = []

    def judge(model: str, messages: list[dict]) -> str:
        scorer_calls.append(model)
        return answer(model, messages)

    cache = tmp_path / "cache.jsonl"
    orig = data.JudgeScorer.__init__

    def patched(self, model, cache=None, answer_fn=None):  # type: ignore[no-untyped-def]
        orig(self, model, cache, judge)

    data.JudgeScorer.__init__ = patched  # type: ignore[method-assign]
    try:
        recs = list(data.from_live(prompts, ["good", "flaky", "bad"], "judge:j", cache, concurrency=2, retries=2,
                                   answer_fn=answer))
        assert [r["target"] for r in recs] == ["good long answer"] * 2
        assert recs[0]["id"] == "p1" and recs[0]["scores"] == [3.0, 3.0, 7.0]
        n_calls, n_judge = len(calls), len(scorer_calls)
        again = list(data.from_live(prompts, ["good", "flaky", "bad"], "judge:j", cache, answer_fn=answer))
        assert again == recs and len(scorer_calls) == n_judge and len(calls) == n_calls  # all from the cache
    finally:
        data.JudgeScorer.__init__ = orig  # type: ignore[method-assign]
    with pytest.raises(data.DataError, match="unknown scorer"):
        data.make_scorer("magic")
