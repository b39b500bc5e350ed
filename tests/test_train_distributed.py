"""Multi-process training for real: ``accelerate launch --num_processes 2 --cpu`` (gloo), against
one process with twice the gradient accumulation: the default recipe, and sft-fast (whose states
are built mid-run by the SFT'd model, by each process for the prompts it consumes)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
RECORDS = [
    {"messages": [{"role": "user", "content": f"Question number {i}: name a {thing}."}],
     "target": f"My favourite {thing} is number {i}.", "others": [f"{thing} {i}? {thing}!", "I do not know"]}
    for i, thing in enumerate(["colour", "fruit", "city", "river", "tree", "bird", "song", "book", "game", "dish"])
]
STEPS = 3
#: the two runs see the same samples per step; they differ only in how the gradient is summed
#: (all-reduce across processes against accumulation in one), so float32 rounding only
TOLERANCE = dict(rel=1e-3, abs=1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "DIFFPO_TRAIN_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(out: Path) -> list[float]:
    """Per optimizer step: the loss (averaged over processes by Trainer) and the gradient norm."""
    history = json.loads((out / "log_history.json").read_text())
    return [v for h in history if "loss" in h for v in (h["loss"], h["grad_norm"])]


@pytest.mark.parametrize(("recipe", "share"), [("fast", 5), ("sft-fast", 3)])
def test_two_processes_match_one_with_double_accumulation(recipe: str, share: int, tiny_llama_dir: str,
                                                          tmp_path: Path) -> None:
    data = tmp_path / "traj.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]))
    common = ["--model", tiny_llama_dir, "--data", str(data), "--eval-data", str(held), "--max-response-tokens", "8",
              "--max-steps", str(STEPS), "--learning-rate", "1e-3", "--per-device-train-batch-size", "1",
              "--logging-steps", "1", "--eval-strategy", "no", "--save-strategy", "no", "--final-eval", "false",
              "--guard", "false", "--jacobi-states-per-prompt", "1", "--disable-tqdm", "true",
              "--dataloader-pin-memory", "false", "--report-to", "none", "--use-cpu", "true", "--seed", "0",
              "--recipe", recipe]
    two = tmp_path / "two"
    # accelerate 1.x starts one process for `--cpu --num_processes 2` unless given an MPI hostfile;
    # `--multi_gpu` starts them through torchrun, and `--use-cpu true` makes them CPU (gloo) processes
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", str(free_port()), "-m", "diffpo_sdk.train", *common,
                "--output-dir", str(two), "--gradient-accumulation-steps", "1"], tmp_path)
    for rank in (0, 1):
        assert f"process {rank} of 2 (distributed, backend gloo)" in proc.stderr, proc.stderr[-4000:]
    # each process built the states of the prompts it consumes (every other batch of the shared
    # order: 5 of the 10 each; sft-fast from its third step on, its second batch being fetched before the
    # SFT phase ended: 3), once, in one group of at most 8
    built = re.findall(r"states (\w+) of (\d+) prompts built in", proc.stderr)
    assert sorted(int(size) for _, size in built) == [share, share], proc.stderr[-4000:]
    assert len({key for key, _ in built}) == 2
    if recipe == "sft-fast":  # both processes left the SFT phase after step 1 (int(0.6 * 3))
        assert proc.stderr.count("step 1: the SFT phase is over") == 2
    one = tmp_path / "one"
    run([sys.executable, "-m", "diffpo_sdk.train", *common, "--output-dir", str(one),
         "--gradient-accumulation-steps", "2"], tmp_path)
    a, b = losses(two), losses(one)
    assert len(a) == len(b) == 2 * STEPS
    assert a == pytest.approx(b, **TOLERANCE)
    assert a[0] != pytest.approx(a[-2], rel=1e-3)  # the model moved: later losses test the updates too
    card = (two / "README.md").read_text()
    assert f"**Recipe:** `{recipe}`" in card
