"""Every example runs as written (smoke level), with small answer budgets.

The in-process examples run in this test process (``runpy``), so the refiner loads once;
the OpenAI-proxy example starts its own local LLM and refining proxy as child processes.
"""

from __future__ import annotations

import ast
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def _examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # they import their shared set-up, _local.py


def run_example(name: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_lcel_chain(capsys, monkeypatch, smollm2_path):
    run_example("lcel_chain.py", "--max-new-tokens", "12", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "stats: refined=True prompt=captured" in out  # the refiner saw the chat model's prompt
    assert out.count("refined (str):") == 2


def test_agent_middleware(capsys, monkeypatch, smollm2_path):
    run_example("agent_middleware.py", "--max-new-tokens", "12", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "tool call today (not refined: True)" in out
    assert "AIMessage (refined=True" in out


def test_litellm_completion(capsys, monkeypatch, smollm2_path):
    run_example("litellm_completion.py", "--max-new-tokens", "12", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "stats: refined=True" in out and "streamed:" in out


def test_litellm_proxy_hook(capsys, monkeypatch, smollm2_path):
    run_example("litellm_proxy_hook.py", "--max-new-tokens", "12", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "'refined': True" in out and "stream:" in out and "opted out, untouched:" in out


def test_speed_quality(capsys, monkeypatch, tmp_path, smollm2_path):
    png = tmp_path / "sq.png"
    run_example("speed_quality.py", "--num-prompts", "2", "--max-new-tokens", "16", "--block-sizes", "1,8",
                "--caps", "none,1", "--out", str(png), monkeypatch=monkeypatch)
    rows = json.loads(png.with_suffix(".json").read_text())
    assert png.stat().st_size > 1000 and len(rows) == 3
    uncapped = [r for r in rows if r["cap"] is None]
    assert all(r["agreement"] == 1.0 for r in uncapped)  # exact at every block size
    capped = next(r for r in rows if r["cap"] == 1)
    assert capped["passes_per_token"] <= uncapped[-1]["passes_per_token"]


@pytest.mark.timeout(600)
def test_openai_sdk_against_the_refining_proxy(smollm2_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "openai_proxy.py"), "--max-new-tokens", "12"],
                          check=False, capture_output=True, text=True, env=env, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refined:" in proc.stdout and "'refined': True" in proc.stdout, proc.stdout


def test_multi_endpoint_spreads_and_fails_over(capsys, monkeypatch, smollm2_path):
    run_example("multi_endpoint.py", "--max-new-tokens", "8", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    counts = ast.literal_eval(out.split("requests per server:", 1)[1].splitlines()[0])  # {url: n}, printed by the example
    assert sorted(counts.values()) == [1, 1]  # two calls, one on each server
    assert "after failover, refined:" in out
    assert int(out.split("requests on the survivor:", 1)[1].split()[0]) == 2


def test_docs_build(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    root = EXAMPLES.parent
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--site-dir", str(tmp_path / "site")],
                          check=False, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "DiffPORefiner" in api and "from_pretrained" in api  # generated from the docstrings
