"""Axolotl plugin: functional networks frozen during Axolotl training, options in the Axolotl YAML.

    plugins:
      - fnscale.integrations.axolotl.FunctionalNetworkPlugin
    fnscale_networks: ica_templates/global_templates.json
    fnscale_components: [0, 1, 2]
    fnscale_mode: lesion            # or preserve; also fnscale_effect, fnscale_control, fnscale_seed, fnscale_layers

Axolotl builds the trainer (LoRA already applied) and then asks each plugin for callbacks
(`add_callbacks_post_trainer`): this one returns a `FunctionalNetworkCallback`, so the masks go on at the start of
training, are restored after every optimizer step and come off at the end. Importable without Axolotl (the base
classes fall back to `object`); Axolotl itself pins its own transformers, so install it in its own environment.
"""

from __future__ import annotations

try:
    from axolotl.integrations.base import BasePlugin
    from pydantic import BaseModel
except ImportError:  # the plugin only runs inside Axolotl, but the module imports anywhere
    BasePlugin = BaseModel = object

from fnscale.errors import UsageError


class FunctionalNetworkArgs(BaseModel):
    """The plugin's YAML keys (Axolotl validates the config against this model)."""

    fnscale_networks: str | None = None
    fnscale_components: list[int] | int | str | None = None
    fnscale_mode: str = "lesion"
    fnscale_effect: str = "update"
    fnscale_control: str | None = None
    fnscale_seed: int = 0
    fnscale_layers: list[int] | str | None = None


class FunctionalNetworkPlugin(BasePlugin):
    """Adds `FunctionalNetworkCallback` to Axolotl's trainer, configured by the `fnscale_*` keys."""

    def get_input_args(self) -> str:
        return "fnscale.integrations.axolotl.FunctionalNetworkArgs"

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        from fnscale.integrations.trainer import FunctionalNetworkCallback

        if not cfg.fnscale_networks or cfg.fnscale_components is None:
            raise UsageError(
                "the fnscale Axolotl plugin needs fnscale_networks (a networks file) and "
                "fnscale_components (e.g. [0, 1]) in the YAML"
            )
        return [
            FunctionalNetworkCallback(
                cfg.fnscale_networks,
                components=cfg.fnscale_components,
                mode=cfg.fnscale_mode or "lesion",
                effect=cfg.fnscale_effect or "update",
                control=cfg.fnscale_control,
                seed=cfg.fnscale_seed or 0,
                layers=cfg.fnscale_layers,
            )
        ]
