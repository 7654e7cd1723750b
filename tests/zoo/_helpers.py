"""Shared pieces of the zoo tests: the language-model loss of either kind of model, transformers' counts."""

import copy

import torch

from lightning_moe import zoo


def is_encoder_decoder(name: str) -> bool:
    return zoo.family_of(name) == "switch"


def lm_loss(model: torch.nn.Module, name: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (decoder-only) or teacher-forced cross-entropy (encoder-decoder)."""
    if is_encoder_decoder(name):
        decoder_input_ids = torch.roll(input_ids, 1, dims=1)
        decoder_input_ids[:, 0] = 0
        logits = model(input_ids, decoder_input_ids).logits
        targets = input_ids
    else:
        logits = model(input_ids).logits[:, :-1]
        targets = input_ids[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def transformers_counts(hf_config: dict) -> tuple[int, int]:
    """Total and active parameters of transformers' own model for ``hf_config``, built on the meta device.

    Active: all but the ``E - k`` of ``E`` routed experts a token skips (not DeepSeek's or Qwen's shared experts).
    """
    import transformers

    config = transformers.AutoConfig.for_model(**copy.deepcopy(hf_config))
    with torch.device("meta"):
        if config.model_type == "switch_transformers":
            model = transformers.SwitchTransformersForConditionalGeneration(config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    routed = getattr(config, "num_local_experts", None) or getattr(config, "n_routed_experts", None)
    routed = routed or config.num_experts
    top_k = getattr(config, "num_experts_per_tok", 1)  # Switch routes each token to one expert
    inactive = 0
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):  # the routed experts only
            inactive += sum(p.numel() for p in module.parameters()) * (routed - top_k) // routed
    return total, total - inactive
