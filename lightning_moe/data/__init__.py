"""Data: the embedded corpus, byte-level BPE tokenizers and the packed-token LightningDataModule."""

from lightning_moe.data.corpus import expand_sources, read_documents, stdlib_files
from lightning_moe.data.datamodule import (
    PackedBlocks,
    PaddedPredictSampler,
    TextDataModule,
    default_cache_dir,
    unigram_entropy,
)
from lightning_moe.data.tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, train_bpe

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "PackedBlocks",
    "PaddedPredictSampler",
    "TextDataModule",
    "default_cache_dir",
    "expand_sources",
    "load_tokenizer",
    "read_documents",
    "stdlib_files",
    "train_bpe",
    "unigram_entropy",
]
