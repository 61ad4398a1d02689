"""LlamaRing: an FMS causal LM run with ring attention.

Every rank passes the same full ``input_ids``; LlamaRing feeds the model only
this rank's tokens (with their global positions), so embeddings, MLPs and
norms run on 1/W of the sequence, attention goes through the ``"ring"`` op,
and only the logits the caller asked for are computed and gathered. Which
attention a call runs is a mode of :mod:`fmsring.modes`; LlamaRing only
picks it and makes the FMS call for it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from fms.utils.headless import gather_outputs
from torch import nn

from fmsring import families, ssm
from fmsring import rates as device_rates
from fmsring.attention_op import ATTN_NAME
from fmsring.cache import DEFAULT_HEADROOM, RingCache
from fmsring.comm import check_same_on_all_ranks
from fmsring.decode_graph import DecodeGraphs
from fmsring.fusion import chunk_feedforward, fuse_decoder_blocks, fuse_elementwise, position_encoders
from fmsring.modes import AttentionMode, Call, decode, followup, prefill, replicated
from fmsring.rates import Rates
from fmsring.rope import RopeTables
from fmsring.strategy import RingAttentionStrategy
from fmsring.validation import attention_layers, check_inputs


class LlamaRing(nn.Module):
    """Ring-attention (context-parallel) inference for an FMS decoder.

    Works for the FMS decoders it runs exactly (:mod:`fmsring.families`:
    LLaMA, Granite, Mistral, Qwen3, Mixtral, gpt-oss and Granite-SWA with
    their sinks and sliding windows, Bamba with its Mamba2 layers
    (:mod:`fmsring.ssm`); any other model is refused here), unsharded
    or sharded by FMS's tensor parallelism over the strategy's TP group: the
    ring then runs on each TP rank's heads and caches its kv-heads. Call it like
    the FMS model: ``model(ids, position_ids=..., mask=..., last_n_tokens=n,
    use_cache=..., past_key_value_states=...)``; every rank gets the logits the
    unsharded model would return. ``fms.utils.generation.generate`` works on
    it. It always runs without autograd (inference only), whatever the
    caller's grad mode.

    Each call is one attention mode (:mod:`fmsring.modes`): a prompt is a
    ring prefill (in chunks of ``prefill_chunk`` tokens if set); new tokens
    on a cache are a sharded follow-up (``followup``: pass_kv, pass_q or
    auto, chosen by the device's rates, measured once), one token the static
    decode step (a CUDA graph on GPUs; a padding mask rides along as a bias
    per cache slot), and steps of several tokens shorter than the world size
    or carrying a mask run replicated.

    ``fuse`` compiles FMS's norms, gated MLPs and RoPE (on CUDA), and with
    ``fuse_layers`` every decoder layer of a decode step as one graph
    (:class:`fmsring.fusion.FusedDecoderBlock`; off, the first step of a new
    cache compiles faster and launches more kernels).

    ``check_inputs`` compares every rank's inputs once per prompt or
    follow-up; a one-token decode step makes no host sync at all, so the
    host can queue the next step while the device runs this one.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: RingAttentionStrategy,
        check_inputs: bool = True,
        cache_headroom: int = DEFAULT_HEADROOM,
        ffn_chunk: int = 16384,
        cuda_graphs: bool = True,
        fuse: bool = True,
        fuse_layers: bool = True,
        followup: str = "auto",
        prefill_chunk: int = 0,
    ):
        super().__init__()
        attns = attention_layers(model, strategy, followup, prefill_chunk)
        self.model = model
        self.strategy = strategy
        self.check_inputs = check_inputs
        self.cache_headroom = cache_headroom
        self.recurrent = ssm.has_ssm(model)  # Mamba2 layers (fmsring.ssm)
        self.cuda_graphs = cuda_graphs
        self.followup = followup
        self.prefill_chunk = prefill_chunk
        self.attn = attns[0]
        self.n_layers = len(attns)
        self.window_holders = families.window_holders(model)
        # gpt-oss's forward takes no last_n_tokens (it would reach the op): all logits, narrowed here
        self.narrows = "last_n_tokens" in inspect.signature(model.forward).parameters
        self.graphs = DecodeGraphs()
        self.rope = RopeTables(position_encoders(model))
        self.device_rates: Rates | None = None  # measured at the first follow-up that needs them
        ssm.make_ring(model)
        if fuse:
            fuse_elementwise(model)
        if fuse and fuse_layers:
            fuse_decoder_blocks(model)
        if ffn_chunk > 0:
            chunk_feedforward(model, ffn_chunk)

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_value_states: list | None = None,
        use_cache: bool = False,
        last_n_tokens: int = 0,
        mask: torch.Tensor | None = None,
        attn_name: str = ATTN_NAME,
        only_last_token: bool = False,
        **unknown: Any,
    ):
        check_inputs(x, position_ids, mask, next(self.model.parameters()).device)
        if attn_name != ATTN_NAME:
            raise ValueError(f"LlamaRing always uses ring attention; drop attn_name={attn_name!r}")
        if only_last_token:
            raise ValueError("only_last_token is deprecated in FMS; pass last_n_tokens=1")
        if unknown:  # FMS would pass them to every attention op: the ring's take none
            raise TypeError(f"LlamaRing takes no keyword argument(s) {sorted(unknown)}")
        if isinstance(past_key_value_states, RingCache):
            past_key_value_states.check_usable()  # a consumed cache is empty: it would read as no cache
        call = Call(x, position_ids, last_n_tokens, mask)
        cached = use_cache and bool(past_key_value_states)
        if self.recurrent and mask is not None:
            raise ValueError(
                f"ring attention cannot run {type(self.model).__name__} with a padding mask (padded batches): "
                "its Mamba2 layers run unmasked prompts only (fmsring.ssm)"
            )
        one_step = cached and x.shape[1] == 1
        if self.check_inputs and not one_step:  # once per prompt or follow-up; a decode step never syncs
            check_same_on_all_ranks([x, position_ids, mask], self.strategy.model_groups)
        if cached:
            return self._continue(call, past_key_value_states)
        if self.prefill_chunk and x.shape[1] > self.prefill_chunk and mask is None:
            return prefill.chunked(self, call, self.prefill_chunk, use_cache)
        return prefill.prefill(self, call, use_cache)

    def _continue(self, call: Call, cache: Any) -> tuple[torch.Tensor, RingCache]:
        """New tokens on a cache: the static decode step, a sharded follow-up or a replicated step."""
        if not isinstance(cache, RingCache):
            raise TypeError(
                "past_key_value_states must be the RingCache this model returned "
                "(generate(..., contiguous_cache=True) rebuilds it as a plain list: leave it off)"
            )
        n = call.ids.shape[1]
        if n == 1:
            return decode.step(self, call, cache)
        if call.mask is not None or n < self.strategy.world_size:
            return replicated.step(self, call, cache)
        return followup.step(self, call, cache)

    def windows(self) -> tuple[int, ...]:
        """The sliding windows the model's blocks hold now (a test may set them after loading)."""
        return families.windows(self.window_holders)

    def run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        layers: list | None,
        use_cache: bool,
        last_n_tokens: int,
        ctx: AttentionMode,
    ) -> tuple[torch.Tensor, list | None]:
        """The FMS model on ``ids`` with ``ctx`` as every layer's attention (:class:`fmsring.modes.Ring`)."""
        narrow = {"last_n_tokens": last_n_tokens} if self.narrows else {}
        out = self.model(
            ids,
            position_ids=positions,
            past_key_value_states=layers,
            use_cache=use_cache,
            attn_name=ATTN_NAME,
            ring=ctx,
            **narrow,
        )
        logits, layers = out if use_cache else (out, None)
        return (logits if self.narrows else gather_outputs(logits, last_n_tokens)), layers

    def zero_states(self, batch: int) -> list:
        """Per decoder layer, a zero Mamba2 state or None (attention); empty without Mamba2 layers."""
        return ssm.zero_states(self.model, batch, next(self.model.parameters())) if self.recurrent else []

    def rates(self, dtype: torch.dtype) -> Rates:
        """This device's rates, measured at the first call (collective: every rank of the mesh
        calls it together) and rank 0's on every rank, so that all choose alike."""
        if self.device_rates is None:
            attn, st = self.attn, self.strategy
            device = next(self.model.parameters()).device
            measured = device_rates.measure(device, dtype, attn.nheads, attn.emb_kq_per_head, st.group)
            self.device_rates = device_rates.agreed(measured, st.model_groups)
        return self.device_rates
