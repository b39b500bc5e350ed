"""``scripts/gpu-train.sh`` runs end to end: its CPU dry run trains both rows on the real data.

The GPU run itself needs a lent GPU; the dry run walks every step of it (data build, the
`sft` control, `sft-fast` through its phase switch, both final tables) on a few prompts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffpo_sdk.shared_data import ALPACA_PREFERENCES, shared_file

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_train_dry_run_trains_the_control_and_the_default_recipe(smollm2_path: str, tmp_path: Path) -> None:
    alpaca, hh = shared_file(ALPACA_PREFERENCES), shared_file("hh_rlhf/harmless_base_pairs.jsonl.gz")
    if alpaca is None or hh is None:
        pytest.skip("shared data not found")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "DIFFPO_SKIP_INSTALL": "1",
           "DATA": str(alpaca.parents[1])}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-train.sh"), "--device", "cpu"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "gpu-train.md").read_text()
    assert "## sft\n" in report and "## sft-fast\n" in report
    for run in ("sft", "sft-fast"):
        table = json.loads((tmp_path / "runs" / run / "eval_results.json").read_text())
        before, after = table["columns"]["before"], table["columns"]["after"]
        assert after["heldout_ar_loss"] < before["heldout_ar_loss"]  # it trained on the preferred answers
        assert table["recipe"] == run and table["steps"] == (4 if run == "sft" else 6)
    assert "the SFT phase is over" in proc.stderr
