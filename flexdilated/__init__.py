"""flexdilated: LongNet's dilated attention as FlexAttention block masks compiled into fused kernels."""

from .attention import dilated_attention
from .modules import DilatedAttention, MultiheadDilatedAttention
from .picture import save_mask_png
from .reference import dilated_mask, reference_dilated_attention
from .spec import DilatedSpec

__all__ = [
    "DilatedSpec",
    "dilated_attention",
    "reference_dilated_attention",
    "dilated_mask",
    "save_mask_png",
    "DilatedAttention",
    "MultiheadDilatedAttention",
]
__version__ = "0.1.0"
