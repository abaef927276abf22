"""Data: text -> token shards (``prepare``) and language-modelling batches (``TokenShards``)."""
from .prepare import prepare, split_for_encoding
from .shards import TokenShards

__all__ = ["prepare", "split_for_encoding", "TokenShards"]
