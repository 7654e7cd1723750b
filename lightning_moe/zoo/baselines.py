"""Dense baselines of the tiny decoder-only presets: ``NAME-dense`` and ``NAME-dense-total``.

``mixtral-tiny-dense`` is ``mixtral-tiny`` with ``dense="active"``: every MoE layer replaced by one FFN of width
``top_k * F + S`` (the FFN parameters a token uses); ``mixtral-tiny-dense-total`` has ``dense="total"``, width
``E * F + S`` (all of the layer's FFN parameters). Any preset takes the same ``dense`` override.
"""

from __future__ import annotations

import dataclasses

from lightning_moe.zoo import deepseek, glam, mixtral, qwen_moe, registry  # noqa: F401  (registers the families)

DECODER_TINY_PRESETS = ("mixtral-tiny", "qwen-moe-tiny", "qwen3-moe-tiny", "deepseek-tiny", "glam-tiny")

for _name in DECODER_TINY_PRESETS:
    _cfg = registry.config(_name)
    registry.register_presets(
        registry.family_of(_name),
        {
            f"{_name}-dense": dataclasses.replace(_cfg, dense="active"),
            f"{_name}-dense-total": dataclasses.replace(_cfg, dense="total"),
        },
    )
