"""fmsring: ring attention (context parallelism) for IBM's Foundation Model Stack."""

from fmsring.comm import maybe_init_dist
from fmsring.model import LlamaRing, get_model
from fmsring.strategy import RingAttentionStrategy

__all__ = ["LlamaRing", "RingAttentionStrategy", "get_model", "maybe_init_dist"]
