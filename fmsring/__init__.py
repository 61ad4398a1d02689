"""fmsring: ring attention (context parallelism) for IBM's Foundation Model Stack."""

from fmsring import attention_op
from fmsring.comm import maybe_init_dist
from fmsring.generation import generate
from fmsring.loading import get_model
from fmsring.model import LlamaRing
from fmsring.strategy import RingAttentionStrategy

attention_op.register()  # the "ring" op, once per process, before any model can call it

__all__ = ["LlamaRing", "RingAttentionStrategy", "generate", "get_model", "maybe_init_dist"]
