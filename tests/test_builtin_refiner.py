"""The built-in trained refiner ``smollm2-135m-diffpo``: a LoRA adapter in package data on the
built-in SmolLM2 weights, found by name, offline, merged at load and still exact.

Two adapters go through the same path: a random one written to a temporary models folder (so
the plumbing is tested in every checkout), and the shipped one (skipped where it is absent).
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from diffpo_sdk import builtin_refiners
from diffpo_sdk.builtin_refiners import BUILTIN_REFINER, DIFFPO_NAME, SMOLLM2_NAME
from diffpo_sdk.engine import RefinerEngine
from diffpo_sdk.errors import ModelNotFoundError

from engine_oracle import ORACLE_ITEMS, greedy_reference

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = builtin_refiners.MODELS_DIR / DIFFPO_NAME
ABSENT = (f"the built-in trained refiner is not in this checkout ({SHIPPED.relative_to(ROOT)}/ has no "
          "adapter_config.json); it is built by the command under 'Built-in trained refiner' in docs/training.md")
N = 24
ITEMS = ORACLE_ITEMS[:2]


def random_lora(base_path: str, out: Path, base_name: str = SMOLLM2_NAME, seed: int = 0) -> Path:
    """A rank-8 LoRA on every linear layer with small random weights (B nonzero, so it changes the
    answers), saved as the trainer saves one: its base named by the user-facing name."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def random_models_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_path: str) -> Path:
    root = tmp_path_factory.mktemp("models")
    random_lora(smollm2_path, root / DIFFPO_NAME)
    return root


@pytest.fixture(params=["random-in-tmp", "shipped"])
def builtin_engine(request: pytest.FixtureRequest, random_models_dir: Path,
                   monkeypatch: pytest.MonkeyPatch) -> tuple[RefinerEngine, Path, list[dict]]:
    """The engine loaded by the built-in name, the adapter folder it must have used, and the
    items to check it on (one for the random adapter, to keep the plumbing check short)."""
    if request.param == "shipped":
        if not (SHIPPED / "adapter_config.json").is_file():
            pytest.skip(ABSENT)
        folder = SHIPPED
    else:
        monkeypatch.setattr(builtin_refiners, "MODELS_DIR", random_models_dir)
        folder = random_models_dir / DIFFPO_NAME
    engine = RefinerEngine.from_pretrained(DIFFPO_NAME, device="cpu", dtype="float32", calibrate=False)
    return engine, folder, (ITEMS if request.param == "shipped" else ITEMS[:1])


@pytest.fixture(scope="module")
def smollm2_engine() -> RefinerEngine:
    return RefinerEngine.from_pretrained(SMOLLM2_NAME, device="cpu", dtype="float32", calibrate=False)


def unmerged_reference(engine: RefinerEngine, folder: Path, smollm2_path: str) -> SimpleNamespace:
    """The base with the adapter applied by PEFT, not merged: the oracle that also checks the merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    assert any("lora_A" in n for n, _ in model.named_parameters())
    return SimpleNamespace(model=model, tokenizer=engine.tokenizer, device=engine.device,
                           stop_ids=engine.stop_ids, pad_id=engine.pad_id)


def test_builtin_name_is_merged_and_equals_greedy_generate_of_base_plus_adapter(
        builtin_engine: tuple[RefinerEngine, Path, list[dict]], smollm2_engine: RefinerEngine,
        smollm2_path: str) -> None:
    engine, folder, items = builtin_engine
    assert engine.model_name == DIFFPO_NAME
    # merged: the same architecture and parameter count as the base, so it decodes as fast
    assert type(engine.model) is type(smollm2_engine.model)
    assert not any("lora" in n for n, _ in engine.model.named_parameters())
    assert sum(p.numel() for p in engine.model.parameters()) == sum(p.numel() for p in smollm2_engine.model.parameters())
    reference = unmerged_reference(engine, folder, smollm2_path)
    changed = False
    for item in items:
        expected = greedy_reference(reference, item, N)  # type: ignore[arg-type]
        for block in (1, 16, N):
            assert engine.refine([item], block_size=block, max_new_tokens=N)[0].token_ids == expected, (item, block)
        changed |= expected != greedy_reference(smollm2_engine, item, N)
    assert changed, "the adapter left every answer as the base model's"


def test_missing_artefact_is_a_clear_model_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin_refiners, "MODELS_DIR", tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"not in this install.*docs/training\.md"):
        RefinerEngine.from_pretrained(DIFFPO_NAME.upper(), device="cpu")


def test_serve_loads_the_builtin_name(random_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``diffpo serve --model smollm2-135m-diffpo``: the server's own loader, behind the real app."""
    from diffpo_sdk.server.__main__ import build_parser, engine_loader
    from diffpo_sdk.server.app import create_app
    from diffpo_sdk.testing import ServerThread

    monkeypatch.setattr(builtin_refiners, "MODELS_DIR", random_models_dir)
    assert build_parser().parse_args([]).model == BUILTIN_REFINER
    args = build_parser().parse_args(["--model", DIFFPO_NAME, "--device", "cpu", "--dtype", "float32"])
    loaded: list[RefinerEngine] = []

    def load() -> RefinerEngine:
        loaded.append(engine_loader(args)())
        return loaded[0]

    server = ServerThread(create_app(load)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            deadline = time.monotonic() + 300
            while (h := c.get("/health")).status_code != 200:
                assert h.status_code == 503 and h.json()["status"] == "loading", h.text
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert DIFFPO_NAME in c.get("/v1/models").text
            r = c.post("/v1/refine", json={"items": ITEMS[:1], "block_size": 8, "max_new_tokens": N})
        assert r.status_code == 200, r.text
        assert r.json()["items"][0]["text"] == loaded[0].refine(ITEMS[:1], block_size=8, max_new_tokens=N)[0].text
    finally:
        server.stop()


def test_diffpo_model_env_picks_the_shipped_refiner(monkeypatch: pytest.MonkeyPatch) -> None:
    """``DIFFPO_MODEL=smollm2-135m-diffpo`` and the in-process client (the default backend)."""
    from diffpo_sdk.client import InProcessClient
    from diffpo_sdk.settings import DiffPOSettings

    monkeypatch.delenv("DIFFPO_MODEL", raising=False)
    assert DiffPOSettings().model == BUILTIN_REFINER
    if not (SHIPPED / "adapter_config.json").is_file():
        pytest.skip(ABSENT)
    monkeypatch.setenv("DIFFPO_MODEL", DIFFPO_NAME)
    client = InProcessClient(device="cpu", dtype="float32")
    assert client.engine.model_name == DIFFPO_NAME
    out = client.refine(ITEMS[:1], block_size=4, max_new_tokens=12).items[0]
    assert out.text == client.engine.refine(ITEMS[:1], block_size=12, max_new_tokens=12)[0].text


def test_shipped_artefact_is_compact_offline_and_packaged() -> None:
    """At most 20 MB, its base named by the built-in name, every file matched by the package-data
    globs (so a wheel ships it), and it loads with the hub unreachable."""
    if not (SHIPPED / "adapter_config.json").is_file():
        pytest.skip(ABSENT)
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert json.loads((SHIPPED / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2_NAME
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["diffpo_sdk"]
    needed = [p for p in files if p.suffix in (".json", ".safetensors") or p.name == "README.md"]
    for p in needed:
        rel = p.relative_to(SHIPPED.parents[1]).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not in the package data"
    code = ("from diffpo_sdk.engine import RefinerEngine; "
            f"e = RefinerEngine.from_pretrained({DIFFPO_NAME!r}, device='cpu', calibrate=False); "
            "print(e.model_name, e.refine([{'prompt': 'Hi', 'draft': 'Hello'}], max_new_tokens=4)[0].new_tokens)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[0] == DIFFPO_NAME


def test_an_adapter_trained_on_an_adapter_loads_on_both(tiny_llama_dir: str, tmp_path: Path) -> None:
    """What ``diffpo train --model smollm2-135m-diffpo --lora-r 8`` writes: an adapter whose base is
    itself an adapter folder. It loads on the merged inner adapter and equals greedy generate of
    base + inner (merged) + outer (not merged)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    inner = random_lora(tiny_llama_dir, tmp_path / "inner", base_name=tiny_llama_dir, seed=1)
    outer = random_lora(tiny_llama_dir, tmp_path / "outer", base_name=str(inner), seed=2)
    engine = RefinerEngine.from_pretrained(str(outer), device="cpu", dtype="float32", calibrate=False)
    assert not any("lora" in n for n, _ in engine.model.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(PeftModel.from_pretrained(base, str(inner)).merge_and_unload(), str(outer))
    reference = SimpleNamespace(model=model.eval(), tokenizer=engine.tokenizer, device=engine.device,
                                stop_ids=engine.stop_ids, pad_id=engine.pad_id)
    without_outer = RefinerEngine.from_pretrained(str(inner), device="cpu", dtype="float32", calibrate=False)
    item = ITEMS[0]
    expected = greedy_reference(reference, item, 16)  # type: ignore[arg-type]
    assert engine.refine([item], block_size=8, max_new_tokens=16)[0].token_ids == expected
    assert expected != greedy_reference(without_outer, item, 16)
