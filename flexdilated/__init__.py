"""flexdilated: LongNet's dilated attention as FlexAttention block masks compiled into fused kernels."""

from .attention import dilated_attention, dilated_attention_step
from .models import LongNet, LongNetEncoder, LongNetLM
from .modules import DilatedAttention, MultiheadCrossAttention, MultiheadDilatedAttention
from .positions import RotaryEmbedding
from .picture import plot_mask
from .reference import dilated_mask, reference_dilated_attention
from .spec import DilatedSpec

__all__ = [
    "DilatedSpec",
    "dilated_attention",
    "dilated_attention_step",
    "reference_dilated_attention",
    "dilated_mask",
    "plot_mask",
    "DilatedAttention",
    "MultiheadDilatedAttention",
    "MultiheadCrossAttention",
    "RotaryEmbedding",
    "LongNetLM",
    "LongNetEncoder",
    "LongNet",
]
__version__ = "0.1.0"
