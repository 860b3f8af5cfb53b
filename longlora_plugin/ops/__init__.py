"""S2-Attn as pure tensor code: imports torch only (and flash-attn 2 when it is installed and chosen)."""

from .layout import (
    Segments,
    SegmentBucket,
    TokenLayout,
    bucket_segments,
    s2_segments,
    token_layout,
)
from .shifted_sparse import (
    BACKENDS,
    Backend,
    backend_gaps,
    flash_attn_available,
    layer_gaps,
    s2_attention,
    torch_varlen_available,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "backend_gaps",
    "Segments",
    "SegmentBucket",
    "TokenLayout",
    "bucket_segments",
    "flash_attn_available",
    "layer_gaps",
    "s2_attention",
    "s2_segments",
    "token_layout",
    "torch_varlen_available",
]
