"""`FunctionalNetworkCallback`: `freeze_networks` inside the Hugging Face `Trainer` and TRL's trainers (`SFTTrainer`).

    from fnscale.integrations import FunctionalNetworkCallback
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, peft_config=lora,
                         callbacks=[FunctionalNetworkCallback("networks/global_templates.json", components=[0, 1, 2])])

Events (transformers' `Trainer._inner_training_loop`): `on_train_begin` comes after the model is wrapped by PEFT
(TRL applies `peft_config` in `__init__`), moved to its device, prepared by Accelerate and loaded from a checkpoint
on resume, and after the optimizer is made, so the masks go on the model that trains; `on_optimizer_step` comes
right after `optimizer.step()` (before the scheduler and `zero_grad`), where `restore()` undoes weight decay;
`on_train_end` takes the masks off. Under DDP each rank installs the same masks on its own replica (the callback
receives the unwrapped model); gradient hooks run before DDP's reduction, so the masked slices reduce as zeros.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from transformers import TrainerCallback

from fnscale.masking.freeze import FrozenNetworks, as_templates, freeze_networks
from fnscale.networks.templates import Templates

log = logging.getLogger(__name__)


class FunctionalNetworkCallback(TrainerCallback):
    """Masked neurons' weights stay bit-identical through `Trainer.train()` (weight decay included).

    networks: a networks file or `Templates`; the other arguments are `freeze_networks`'s (effect, control, seed,
    layers, kernel, offload). `frozen`: the `FrozenNetworks` of the last `train()` (None before; removed after it),
    whose `masks` and `stats()` say what was frozen.
    """

    def __init__(
        self,
        networks: Templates | str | os.PathLike,
        components: int | Iterable[int] | str,
        mode: str = "lesion",
        **options,
    ):
        self.templates = as_templates(networks)  # read (and refused, if malformed) when the trainer is built
        self.components, self.mode, self.options = components, mode, options
        self.frozen: FrozenNetworks | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.frozen is not None:  # a second train() on the same trainer (or one that raised)
            self.frozen.remove()
        if model is None:
            raise RuntimeError(
                "FunctionalNetworkCallback needs the model at on_train_begin; use it with a transformers Trainer"
            )
        self.frozen = freeze_networks(model, self.templates, self.components, self.mode, **self.options)
        if state.is_world_process_zero:
            log.info(
                "fnscale: %s-%s masks on components %s, %d neurons frozen",
                self.mode,
                self.frozen.effect,
                self.frozen.components,
                self.frozen.stats()["masked_neurons/total"],
            )

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.frozen is not None and not self.frozen.removed:
            self.frozen.restore()

    def on_train_end(self, args, state, control, **kwargs):
        if self.frozen is not None:
            self.frozen.remove()
