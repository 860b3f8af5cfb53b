"""S2-Attn as pure tensor code: imports torch only (and flash-attn when it is installed and used)."""

from .layout import (
    Segments,
    SegmentBucket,
    TokenLayout,
    bucket_segments,
    resolve_group_size,
    s2_segments,
    token_layout,
)
from .shifted_sparse import Backend, flash_attn_available, s2_attention

__all__ = [
    "Backend",
    "Segments",
    "SegmentBucket",
    "TokenLayout",
    "bucket_segments",
    "flash_attn_available",
    "resolve_group_size",
    "s2_attention",
    "s2_segments",
    "token_layout",
]
