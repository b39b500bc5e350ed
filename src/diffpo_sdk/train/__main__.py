"""``python -m diffpo_sdk.train`` / ``diffpo train``: train a refiner and print the evaluation table.

Flags are ``DiffPOConfig`` fields (all ``TrainingArguments`` plus the DiffPO ones), with
dash or underscore spellings; ``--config FILE`` (YAML or JSON) gives defaults that later
flags override. Runs unchanged under ``accelerate launch -m diffpo_sdk.train``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..protocol import parse_block_size

log = logging.getLogger("diffpo_sdk.train")


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML/JSON mapping of option names (dash or underscore) to values, nested mappings kept."""
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        cfg = yaml.safe_load(text) or {}
    else:
        cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise SystemExit(f"{path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in cfg.items()}


def bare_switches_true(argv: list[str], config_cls: type) -> list[str]:
    """``--guard`` alone means ``--guard true``. A switch whose default comes from the recipe is
    ``bool | None``, and argparse (through ``HfArgumentParser``) then wants a value after it."""
    import typing
    from dataclasses import fields

    hints = typing.get_type_hints(config_cls)
    switches = {f"--{spelling}" for f in fields(config_cls) if hints.get(f.name) == (bool | None)
                for spelling in (f.name, f.name.replace("_", "-"))}
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in switches and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def parse_config(argv: list[str]) -> Any:
    """Flags, over a ``--config`` file's values, over the recipe's, over the built-in defaults.

    The file's values become the parser's defaults as they are (not argv strings), so nested
    mappings such as ``fsdp_config`` reach ``TrainingArguments`` intact.
    """
    from dataclasses import fields

    from transformers import HfArgumentParser

    from .trainer import DiffPOConfig

    argv = list(argv)
    file_values: dict[str, Any] = {}
    if "--config" in argv:
        i = argv.index("--config")
        file_values = read_config_file(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        file_values, argv = read_config_file(argv[0]), []
    argv = bare_switches_true(argv, DiffPOConfig)
    known = {f.name for f in fields(DiffPOConfig) if f.init}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise SystemExit(f"diffpo train: unknown option(s) in the config file: {', '.join(unknown)}")
    parser = HfArgumentParser(DiffPOConfig)
    parser.set_defaults(**file_values)
    (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    if cfg.data is None:
        raise SystemExit("diffpo train: --data is required (trajectories JSONL from `diffpo data build`)")
    return cfg


def load_refiner(cfg: Any) -> tuple[Any, Any]:
    """The engine's loader (hub id, folder, GGUF, built-in SmolLM2), made trainable, LoRA optional."""
    import torch

    from ..engine.loading import load_model_and_tokenizer, resolve_dtype

    model, tok, _ = load_model_and_tokenizer(cfg.model, device=torch.device("cpu"), dtype=resolve_dtype(cfg.model_dtype))
    model.requires_grad_(True).train()
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
        # the engine resolves the base by the user's name (works for the built-in GGUF too)
        model.peft_config["default"].base_model_name_or_path = cfg.model
    return model, tok


def build_datasets(cfg: Any, model: Any, tok: Any) -> tuple[Any, Any, Any]:
    """Train/held-out datasets and the frozen starting model
    that builds states and measures the untrained column (None when all is done before training).

    Training states are built lazily, ``--jacobi-states-chunk`` prompts at a time as batches
    first need them, from a frozen copy of the model as training starts (with LoRA: the
    adapter switched off, no copy); under several processes (DDP) each builds the prompts it
    consumes. Held-out states too, when the first evaluation needs them. A single process with
    the final table on gets the copy whatever the source, so the untrained column is measured
    after training, not before step 1. With FSDP or DeepSpeed, or ``--jacobi-states-chunk 0``,
    every state is built before training, by the main process first, and the other processes
    read them from the cache.
    """
    from ..engine import templating
    from .data import load_trajectories
    from .reference import reference_model
    from .states import LazyStates, model_fingerprint
    from .trainer import TrajectoryDataset, draft_of, split_by_prompt

    records = load_trajectories(cfg.data)
    if cfg.eval_data:
        train_recs, held = records, load_trajectories(cfg.eval_data)[: cfg.max_eval_prompts]
    else:
        train_recs, held = split_by_prompt(records, cfg.eval_fraction, cfg.max_eval_prompts)
    if cfg.max_train_prompts is not None:
        train_recs = train_recs[: cfg.max_train_prompts]
    n = cfg.max_response_tokens
    stop = templating.stop_token_ids(tok, model.config, getattr(model, "generation_config", None))
    probe = TrajectoryDataset(held[:1], tok, n, cfg.max_prompt_tokens, stop_ids=stop)
    need_states = cfg.trajectory_source in ("jacobi", "mix", "frontier")
    sharded = cfg.world_size > 1 and bool(cfg.fsdp or cfg.deepspeed)  # a copy per process would not fit
    lazy = need_states and cfg.jacobi_states_chunk > 0 and not sharded
    if cfg.consistency_start > 0 and need_states and not lazy:
        raise SystemExit("--consistency-start (the sft-fast recipe) builds its states from the model the SFT phase "
                         "made, lazily: it needs --jacobi-states-chunk > 0 and, under several processes, DDP "
                         "(not FSDP or DeepSpeed)")
    # states built during training, and the untrained column measured after it, need the model as
    # it started: a frozen copy (LoRA: the adapter off, no copy); nothing of it delays step 1
    late_before = cfg.final_eval and cfg.world_size == 1
    generator = reference_model(model) if (lazy or late_before) else None
    builder = generator if generator is not None else model
    model_id = f"{cfg.model}|{model_fingerprint(model)}" if need_states else ""
    cache_dir = Path(cfg.jacobi_states_dir or cfg.output_dir) / "jacobi_states"

    def states_for(recs: list[dict], name: str, chunk: int) -> LazyStates:
        prompts = [templating.prompt_ids(tok, r["messages"])[-cfg.max_prompt_tokens:] for r in recs]
        drafts = [templating.draft_ids(tok, draft_of(r)) + [probe.eot] for r in recs]
        return LazyStates(builder, tok, prompts, drafts, n, probe.eot, stop,
                          states_per_prompt=cfg.jacobi_states_per_prompt, batch_size=cfg.per_device_eval_batch_size,
                          seed=cfg.seed, chunk=chunk, cache_dir=cache_dir, model_id=model_id,
                          # built during training, the states' time shows in Trainer's own bar and ETA (and
                          # each chunk in the log); a second bar would only garble that one
                          progress=not (cfg.disable_tqdm or lazy) and cfg.process_index == 0,
                          desc=f"{name} fixed points + states")

    train_states = held_states = None
    with cfg.main_process_first(desc="fixed points and Jacobi states"):
        if need_states:
            train_states = states_for(train_recs, "train", cfg.jacobi_states_chunk)
            if not lazy:
                train_states = train_states.materialize()
            held_states = states_for(held, "held-out", cfg.jacobi_states_chunk)
            if not lazy:
                held_states = held_states.materialize()
    train_ds = TrajectoryDataset(train_recs, tok, n, cfg.max_prompt_tokens, cfg.trajectory_source, train_states,
                                 cfg.seed, stop, cfg.frontier_branches, cfg.frontier_depth)
    eval_ds = TrajectoryDataset(held, tok, n, cfg.max_prompt_tokens, cfg.trajectory_source, held_states, cfg.seed,
                                stop, cfg.frontier_branches, cfg.frontier_depth)
    return train_ds, eval_ds, generator


def model_card(cfg: Any, table: str, guard: str | None) -> str:
    """The project's model card: the recipe that ran, how it differs from the paper, the table."""
    from .recipes import DIFFERS_FROM_PAPER, LOSS_KEYS, TRAIN_KEYS

    keys = [*LOSS_KEYS, "frontier_branches", "frontier_depth", "max_response_tokens", "eval_long_tokens",
            *TRAIN_KEYS[:-1], "max_steps", "per_device_train_batch_size", "lora_r", "seed"]
    conf = "\n".join(f"- `{k}`: {getattr(cfg, k)}" for k in keys)
    overrides = getattr(cfg, "recipe_overrides", {})
    changed = (", ".join(f"`{k}` = {v}" for k, v in overrides.items()) if overrides else "none")
    return (f"---\nbase_model: {cfg.model}\nlibrary_name: diffpo-sdk\ntags: [diffpo, refiner]\n---\n\n"
            f"# DiffPO refiner trained from `{cfg.model}`\n\nTrained with `python -m diffpo_sdk.train "
            f"--recipe {cfg.recipe}` on `{cfg.data}` (L = L_AR + w * L_Con).\n\n"
            f"- **Recipe:** `{cfg.recipe}`; options changed from it: {changed}.\n"
            f"- **How the recipe differs from the paper (eq. 4-6):** {DIFFERS_FROM_PAPER[cfg.recipe]}.\n\n"
            f"Serve it with `diffpo serve --model {cfg.output_dir}` or "
            f"`RefinerEngine.from_pretrained({cfg.output_dir!r})`.\n\n## Configuration\n\n{conf}\n\n"
            f"## Evaluation (held-out prompts)\n\n{table or '(final evaluation disabled)'}\n\n"
            + (f"**Collapse guard fired:** {guard}\n" if guard else
               ("Collapse guards held.\n" if cfg.guard else "Collapse guards were off.\n")))


def check_base_tokenizer(name: str, tok: Any) -> None:
    """``--eval-base-model`` must share the trained model's vocabulary, or its scores would be of
    other token ids; checked before training, so a wrong name fails in seconds, not at the end."""
    from ..engine.loading import load_tokenizer

    if load_tokenizer(name).get_vocab() != tok.get_vocab():
        raise SystemExit(f"--eval-base-model {name} has another tokenizer than the model trained: not comparable")


def evaluate_base(name: str, dtype: str, tok: Any, dataset: Any, evaluate_kw: dict[str, Any],
                  device: Any = "cpu") -> dict[str, float]:
    """The final table's `base` column: another model (the base under the refiner this run
    trained further) measured on the same held-out prompts, drafts and block size, on the
    device the trained model is measured on. Its tokenizer was checked before training."""
    import torch

    from ..engine.loading import load_model_and_tokenizer, resolve_dtype
    from .evaluate import evaluate_refiner

    base, _, _ = load_model_and_tokenizer(name, device=torch.device(device), dtype=resolve_dtype(dtype))
    return evaluate_refiner(base, tok, dataset, **evaluate_kw)


def final_table_kwargs(cfg: Any, eval_ds: Any) -> dict[str, Any]:
    """What ``evaluate_refiner`` measures every column of the final table on: the held-out
    drafts, the transfer drafts (``--transfer-eval-data``), the block size and the losses' options."""
    from .data import load_trajectories
    from .trainer import draft_items, loss_kwargs

    block: int | str = (cfg.max_response_tokens if cfg.eval_block_size == "full"
                        else parse_block_size(cfg.eval_block_size))
    kw: dict[str, Any] = dict(draft_items=eval_ds.draft_items(), block_size=block,
                              batch_size=cfg.per_device_eval_batch_size, long_tokens=cfg.eval_long_tokens,
                              **loss_kwargs(cfg))
    if cfg.transfer_eval_data:
        kw["transfer_items"] = draft_items(load_trajectories(cfg.transfer_eval_data)[: cfg.max_eval_prompts])
    return kw


def table_facts(cfg: Any, evaluate_kw: dict[str, Any], torch: Any) -> dict[str, Any]:
    """What a written table records beside its columns, for a model card to cite."""
    return {"block_size": evaluate_kw["block_size"], "long_tokens": cfg.eval_long_tokens, "model": cfg.model,
            "date": time.strftime("%Y-%m-%d"), "device": device_name(torch)}


def first_step_logger(start: float) -> Any:
    """A callback that logs when the first optimizer step is done, counted from ``start``."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 1 and state.is_world_process_zero:
                log.info("first optimizer step done %.1f s after start", time.time() - start)

    return FirstStep()


def main(argv: list[str] | None = None) -> int:
    start = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_config(argv)

    import torch
    from transformers.trainer_utils import get_last_checkpoint

    from .evaluate import evaluate_refiner, write_table
    from .reference import as_model
    from .trainer import DiffPOTrainer

    if os.environ.get("DIFFPO_TRAIN_THREADS"):
        torch.set_num_threads(int(os.environ["DIFFPO_TRAIN_THREADS"]))
    torch.manual_seed(cfg.seed)
    log.info("process %d of %d (%s, backend %s), recipe %s", cfg.process_index, cfg.world_size,
             cfg.parallel_mode.value, cfg.distributed_state.backend if cfg.distributed_state else None, cfg.recipe)
    model, tok = load_refiner(cfg)
    if cfg.eval_base_model and cfg.final_eval:
        check_base_tokenizer(cfg.eval_base_model, tok)
    train_ds, eval_ds, generator = build_datasets(cfg, model, tok)
    log.info("%d training prompts, %d held out, source=%s", len(train_ds), len(eval_ds), cfg.trajectory_source)

    columns: dict[str, dict[str, float]] = {}
    resume = cfg.resume_from_checkpoint
    if resume in ("true", "True", "last"):
        resume = get_last_checkpoint(cfg.output_dir)
    eval_path = Path(cfg.output_dir) / "eval_before.json"
    evaluate_kw = final_table_kwargs(cfg, eval_ds)

    def measure_before(untrained: Any, losses: dict[str, float] | None = None) -> None:
        t0 = time.time()
        columns["before"] = evaluate_refiner(untrained, tok, eval_ds, losses=losses, **evaluate_kw)
        eval_path.parent.mkdir(parents=True, exist_ok=True)
        eval_path.write_text(json.dumps(columns["before"]))
        log.info("evaluated the untrained model in %.0f s", time.time() - t0)

    before_pending = cfg.final_eval and cfg.process_index == 0
    if before_pending and eval_path.is_file():  # resuming: the untrained model was measured already
        columns["before"] = json.loads(eval_path.read_text())
        before_pending = False
    if before_pending and generator is None:  # no frozen copy to measure later: measure now
        measure_before(model)
        before_pending = False
    model.train()

    trainer = DiffPOTrainer(model=model, args=cfg, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                            ref_model=generator, callbacks=[first_step_logger(start)])
    t0 = time.time()
    trainer.train(resume_from_checkpoint=resume)
    train_s = time.time() - t0
    if before_pending:  # the frozen starting model (or the adapter switched off): measured after, not before, step 1
        with as_model(generator) as untrained:
            measure_before(untrained, trainer.untrained_metrics)

    save_model(trainer, cfg, tok)
    table = ""
    if cfg.final_eval and trainer.is_world_process_zero():
        step, measured = trainer.last_eval or (None, None)
        columns["after"] = evaluate_refiner(trainer.model, tok, eval_ds, **evaluate_kw,
                                            losses=measured if step == trainer.state.global_step else None)
        if cfg.eval_base_model:
            columns = {"base": evaluate_base(cfg.eval_base_model, cfg.model_dtype, tok, eval_ds, evaluate_kw,
                                             device=next(trainer.model.parameters()).device), **columns}
        table = write_table(cfg.output_dir, columns, {"train_seconds": train_s, "steps": trainer.state.global_step,
                                                       "guard": trainer.guard_tripped, "recipe": cfg.recipe,
                                                       **table_facts(cfg, evaluate_kw, torch)})
        print("\n" + table + "\n")
    trainer.model_card = model_card(cfg, table, trainer.guard_tripped)
    if trainer.is_world_process_zero():
        (Path(cfg.output_dir) / "README.md").write_text(trainer.model_card)
        (Path(cfg.output_dir) / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    if cfg.push_to_hub:
        trainer.push_to_hub(commit_message=f"DiffPO refiner, recipe {cfg.recipe}")
    log.info("done %.1f s after start", time.time() - start)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # leave the process group before the interpreter exits, all ranks together: a rank torn
        # down while a peer still writes (rank 0 saves last) can abort in gloo's threads
        # ("terminate called without an active exception", seen in CI)
        trainer.accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
    return 0


def device_name(torch: Any) -> str:
    """Where the run trained, for the results it writes: a GPU's name, or the CPU threads it used."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def save_model(trainer: Any, cfg: Any, tok: Any) -> None:
    """Adapter or full model + tokenizer in ``output_dir``: loads in ``RefinerEngine.from_pretrained``."""
    model = trainer.model
    if cfg.lora_r > 0 and cfg.merge_lora:
        merged = model.merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(cfg.output_dir)
            tok.save_pretrained(cfg.output_dir)
        trainer.model = merged
        return
    trainer.save_model(cfg.output_dir)
    if trainer.is_world_process_zero():
        tok.save_pretrained(cfg.output_dir)


if __name__ == "__main__":
    sys.exit(main())
