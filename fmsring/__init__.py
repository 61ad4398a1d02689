"""fmsring: ring attention (context parallelism) for IBM's Foundation Model Stack."""

from fmsring.comm import maybe_init_dist
from fmsring.loading import get_model
from fmsring.model import LlamaRing
from fmsring.strategy import RingAttentionStrategy

__all__ = ["LlamaRing", "RingAttentionStrategy", "get_model", "maybe_init_dist"]
