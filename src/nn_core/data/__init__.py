"""Data: tokenizers, corpora and token datasets (splits, seeded sampling, evaluation)."""

from .corpus import default_corpus, describe_default_corpus, load_corpus, load_text
from .dataset import BatchSampler, TokenDataset, eval_batches, split_tokens, unigram_entropy
from .tokenizer import ByteTokenizer

__all__ = [
    "BatchSampler",
    "ByteTokenizer",
    "TokenDataset",
    "default_corpus",
    "describe_default_corpus",
    "eval_batches",
    "load_corpus",
    "load_text",
    "split_tokens",
    "unigram_entropy",
]
