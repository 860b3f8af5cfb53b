"""S2-Attn as pure tensor code: imports torch only (and flash-attn when it is installed and used)."""

from .layout import (
    Segments,
    SegmentBucket,
    TokenLayout,
    bucket_segments,
    s2_segments,
    token_layout,
)
from .shifted_sparse import BACKENDS, Backend, flash_attn_available, s2_attention

__all__ = [
    "BACKENDS",
    "Backend",
    "Segments",
    "SegmentBucket",
    "TokenLayout",
    "bucket_segments",
    "flash_attn_available",
    "s2_attention",
    "s2_segments",
    "token_layout",
]
