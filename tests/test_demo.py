"""``diffpo demo`` end to end, small: real local drafts through LiteLLM, real refinement, real baseline."""

from __future__ import annotations

import re

import pytest

from diffpo_sdk.apps import demo


def test_side_by_side_keeps_both_texts():
    out = demo.side_by_side("a b c\n\nsecond", "refined text here", 41, ("draft", "refined"))
    lines = out.splitlines()
    assert lines[0].startswith("draft") and "| refined" in lines[0]
    assert all(len(line) <= 41 for line in lines)
    assert "second" in out and "refined text here" in out


def test_prompts_are_real_and_fall_back_to_the_bundled_file(monkeypatch, tmp_path):
    prompts, source = demo.load_prompts(3)
    assert len(prompts) == 3 and all(p.strip() for p in prompts)
    monkeypatch.setattr(demo, "shared_alpaca_file", lambda: None)
    prompts, source = demo.load_prompts(2)
    assert source.endswith("drafts.jsonl") and len(prompts) == 2


@pytest.mark.timeout(600)
def test_demo_runs_the_whole_path(capsys, smollm2_path):
    rc = demo.main(["--num-prompts", "2", "--max-new-tokens", "12", "--threads", "1", "--width", "100"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "via LiteLLM" in out and "DiffPORefiner" in out
    # each prompt: draft and refined side by side, then passes, tokens/pass and the greedy baseline
    stats = re.findall(r"refiner: (\d+) passes for (\d+) tokens \(([\d.]+) tokens/pass\).*greedy: (\d+) passes.*"
                       r"same answer as greedy: (\w+)", out)
    assert len(stats) == 2, out
    for passes, tokens, _, greedy_passes, same in stats:
        assert 1 <= int(passes) <= int(tokens) <= 12
        assert same == "yes"  # run to convergence, the refined answer is the refiner's greedy answer
    assert "For contrast" in out and "Total" in out


def test_bad_arguments_exit_2():
    assert demo.main(["--num-prompts", "0"]) == 2
