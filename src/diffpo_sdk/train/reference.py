"""The frozen reference model of the KL hold: a copy of the model as training starts, or the
same LoRA model with its adapter off, prepared through accelerate like trl's reference models
(so it is sharded under FSDP and DeepSpeed ZeRO-3, not a full copy on every device)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class AdapterOff:
    """A peft model with its adapter switched off: the model before training, at no memory cost."""

    def __init__(self, model: Any):
        self.model = model
        self.config = model.config

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> AdapterOff:
        self.model.train(mode)
        return self

    def eval(self) -> AdapterOff:
        return self.train(False)

    def parameters(self) -> Any:
        return self.model.parameters()

    def __call__(self, **kw: Any) -> Any:
        with self.model.disable_adapter():
            return self.model(**kw)

    def generate(self, **kw: Any) -> Any:
        with self.model.disable_adapter():
            return self.model.generate(**kw)


def reference_model(model: Any) -> Any:
    """The model as it is now, frozen, for the KL anchor on y*'s path (see ``diffpo_loss``):
    a LoRA model before training is its base, so its adapter switched off costs no copy."""
    if hasattr(model, "disable_adapter"):
        return AdapterOff(model)
    return frozen_copy(model)


def frozen_copy(model: Any) -> Any:
    """A frozen copy of the model as it is now, adapter included."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


@contextmanager
def as_model(ref: Any) -> Iterator[Any]:
    """The reference as a full model object (what the engine and ``generate`` need): a frozen
    copy as it is, a LoRA reference as the peft model with its adapter off for the duration."""
    if isinstance(ref, AdapterOff):
        with ref.model.disable_adapter():
            yield ref.model
    else:
        yield ref


def prepare_reference(ref: Any, accelerator: Any) -> Any:
    """Place and, where the run shards its model, shard the frozen reference for evaluation only.

    DeepSpeed: its own inference engine with the run's ZeRO stage when that is 3 (else stage 0:
    a frozen model needs no partitioned optimizer state). FSDP: wrapped with the run's FSDP
    plugin. Otherwise (single process, DDP): moved to the device, not wrapped (no gradients to
    synchronise). A LoRA reference is the trained model itself and is left as it is.
    """
    from accelerate.utils import DistributedType

    if isinstance(ref, AdapterOff):
        return ref
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        zero = config.get("zero_optimization", {})
        if zero.get("stage") != 3:
            config["zero_optimization"] = {"stage": 0}
        else:
            hidden = getattr(getattr(ref, "config", None), "hidden_size", None)
            for key, value in (("reduce_bucket_size", hidden and hidden * hidden),
                               ("stage3_param_persistence_threshold", hidden and 10 * hidden),
                               ("stage3_prefetch_bucket_size", hidden and int(0.9 * hidden * hidden))):
                if zero.get(key) == "auto" and value:
                    zero[key] = value
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        engine, *_ = deepspeed.initialize(model=ref, config=config)
        engine.eval()
        return engine
    if kind == DistributedType.FSDP:
        if getattr(accelerator, "is_fsdp2", False):
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            ref = fsdp2_prepare_model(accelerator, ref)
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            plugin = accelerator.state.fsdp_plugin
            plugin.set_auto_wrap_policy(ref)
            ref = FSDP(ref, sharding_strategy=plugin.sharding_strategy, cpu_offload=plugin.cpu_offload,
                       auto_wrap_policy=plugin.auto_wrap_policy, mixed_precision=plugin.mixed_precision_policy,
                       sync_module_states=plugin.sync_module_states, backward_prefetch=plugin.backward_prefetch,
                       forward_prefetch=plugin.forward_prefetch, use_orig_params=plugin.use_orig_params,
                       limit_all_gathers=plugin.limit_all_gathers, device_id=accelerator.device)
        ref.eval()
        return ref
    return accelerator.prepare_model(ref, evaluation_mode=True).eval()
