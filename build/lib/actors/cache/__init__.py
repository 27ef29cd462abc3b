"""The offline knowledge cache: teachers' knowledge precomputed once per (teacher, example), read from disk.

A student can then train with no teacher in memory (the Marginal Utility Diminishes paper, Liu et al.
ACL 2021, measured a 2.7-3.4x faster training with precomputed compressed HSK).

Modules:
    format  the on-disk layout (manifest, safetensors shards), constants, errors, `cache_summary`,
            `concat_knowledge`;
    writer  `CacheWriter`: atomic, resumable shard writes;
    reader  `KnowledgeCache` (rows by position, memory-mapped) and `CacheReader` (the
            `actors.knowledge.KnowledgeSource` a trainer uses instead of the teacher pool);
    build   `build_shards`: fills the missing shards from a knowledge source.
"""

from actors.cache.build import build_shards
from actors.cache.format import (EXAMPLE_IDS, FORMAT, MANIFEST, OUTPUT_TENSORS, TENSORS, VERSION, CacheError,
                                 CacheMismatchError, CacheNotFoundError, PartialCacheError, cache_summary,
                                 concat_knowledge)
from actors.cache.reader import CachedKnowledge, CacheReader, KnowledgeCache
from actors.cache.writer import CacheWriter

__all__ = [
    "CacheWriter", "KnowledgeCache", "CacheReader", "CachedKnowledge", "build_shards",
    "CacheError", "CacheNotFoundError", "PartialCacheError", "CacheMismatchError",
    "cache_summary", "concat_knowledge",
    "FORMAT", "VERSION", "MANIFEST", "EXAMPLE_IDS", "TENSORS", "OUTPUT_TENSORS",
]
