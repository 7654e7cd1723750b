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
