"""Hugging Face checkpoint import and export (:func:`from_hf`, :func:`to_hf`)."""

from lightning_moe.interop.hf import CheckpointMismatchError, UnsupportedConfigError, from_hf, hf_config_to_ours, to_hf

__all__ = ["CheckpointMismatchError", "UnsupportedConfigError", "from_hf", "hf_config_to_ours", "to_hf"]
