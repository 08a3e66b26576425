"""The teacher cache: a compressed, sharded Zarr v3 store of a teacher's per-anchor outputs.

``TeacherCache`` reads it (from any training loop); ``StoreWriter`` writes it; the layout is
documented in docs/cache_format.md.
"""

from .format import CacheMismatchError, CacheStoreError, FailedImageError, IncompleteStoreError
from .reader import CacheRecord, TeacherCache

__all__ = ["TeacherCache", "CacheRecord", "CacheStoreError", "CacheMismatchError", "FailedImageError",
           "IncompleteStoreError"]
