"""Apply functional-network masks to a Hugging Face causal LM, and keep masked weights untouched.

In your own training loop, use `fnscale.freeze_networks` (`freeze`, docs/api.md): it wires these pieces as
`fnscale train` does, with update masks by default. The lower-level recipe below shows forward masks.

One module per job: `fnscale.models.mlp` finds the MLPs, `build` makes masks from selected neurons, `apply`
puts them on the model (hooks, compact MLP, Triton dispatch), `guard` keeps masked weights untouched, and
`setup` wires them into training (templates, masks built on the main process and broadcast, the guard).

A mask is a float vector per decoder layer, 1 = keep (see `build`); the masking paths are described in
`apply` and the untouched guarantee in `guard`.

Order in a training script:

    model = get_peft_model(model, lora_config)            # first: hooks must sit on the LoRA wrappers
    layers = find_mlp_layers(model)
    masks = build_masks(neurons_by_layer, "lesion", len(layers), layers[0].width)
    handle = apply_masks(model, masks)
    guard = protect_masked_weights(model, masks)          # before training (and before loading a checkpoint)
    for step, batch in enumerate(loader):
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        if checkpoint_due(step):
            guard.restore(); save_checkpoint()            # masks stay on; training continues
    guard.restore(); handle.remove(); model.save_pretrained(out)   # saved model runs unmasked

While the masks are on, masked weights influence neither the forward nor the gradients, so restoring
them before each save (or unmasked evaluation) is enough; calling guard.restore() after every
optimizer step is also correct, and cheap in lesion mode.
"""

from fnscale.masking.apply import KERNELS, MaskHandle, apply_masks
from fnscale.masking.build import MODES, build_masks, check_masks
from fnscale.masking.guard import MaskedWeightGuard, protect_masked_weights
from fnscale.models.mlp import SITES, MLPLayer, find_mlp_layers, unwrap

__all__ = [
    "KERNELS",
    "MODES",
    "SITES",
    "MLPLayer",
    "MaskHandle",
    "MaskedWeightGuard",
    "apply_masks",
    "build_masks",
    "check_masks",
    "find_mlp_layers",
    "protect_masked_weights",
    "unwrap",
]
