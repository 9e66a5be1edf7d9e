"""dots1 (dots.llm1) as a training model whose state dict matches transformers' `Dots1ForCausalLM`.

Same parameter names as transformers, except routed experts, which are stacked per layer
(`mlp.experts.w_gate_up` [E, H, 2I], `mlp.experts.w_down` [E, I, H]) for grouped kernels;
`anneal.checkpoints.hf_layout` maps them to and from the per-expert names of the released safetensors.
transformers is the reference in parity tests, not the training model: this one is small,
has no KV-cache/generation machinery, and takes pluggable expert backends.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention

from anneal.model.config import Dots1Config
from anneal.model.recompute import check_mode, selective_context_fn
from moe.layer import Dots1MoE, SwiGLUMLP
from moe.router import Router


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [B, S, head_dim] for rotate-half RoPE, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads: x is [B, heads, S, D]
    return x * cos + _rotate_half(x) * sin


def build_document_mask(position_ids: torch.Tensor, flex: bool) -> BlockMask | torch.Tensor:
    """Causal attention confined to each packed document, built once per forward and shared by
    every layer. A document starts where its position id is 0 (the packing restarts them there).
    One predicate, two forms: `flex` -> a FlexAttention BlockMask (CUDA: the fused kernel skips
    the blocks outside every document); else the dense bool mask [B, 1, S, S] for SDPA (CPU:
    FlexAttention has no CPU backward, and eager flex is ~10x slower than SDPA there)."""
    doc = (position_ids == 0).cumsum(-1)
    bsz, seq = position_ids.shape

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    if not flex:
        return create_mask(same_document_causal, bsz, None, seq, seq, device=position_ids.device)
    # on an H100 (B 2, S 4096): 0.4 ms compiled, without a host sync; 10 ms eager
    build = _compiled(create_block_mask) if position_ids.is_cuda else create_block_mask
    return build(same_document_causal, bsz, None, seq, seq, device=position_ids.device)


@functools.cache
def _compiled(fn):
    """torch.compile(fn), made on first use (torch.compile imports dynamo: seconds a CPU run never
    needs). Eager flex_attention materializes the whole score matrix; compiled it is one fused
    Triton kernel."""
    return torch.compile(fn)


class Attention(nn.Module):
    """Qwen3-style attention: no biases, RMSNorm over head_dim on q and k before RoPE (QK-norm)."""

    def __init__(self, cfg: Dots1Config):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=b)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: BlockMask | torch.Tensor | None = None) -> torch.Tensor:
        """`mask`: None = causal over the whole row; else a `build_document_mask`."""
        bsz, seq, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(bsz, seq, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(bsz, seq, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv != self.n_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(mask, BlockMask):
            # traced inside a compiled layer, plain flex_attention is what inductor fuses; eager on
            # CUDA, the compiled wrapper; on CPU, eager (forward only: no CPU backward)
            eager = not q.is_cuda or torch.compiler.is_compiling()
            flex = flex_attention if eager else _compiled(flex_attention)
            out = flex(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Dots1Config, layer_idx: int, experts_backend: str, aux_loss_coef: float,
                 expert_range: tuple[int, int] | None = None):
        super().__init__()
        self.selective = False          # `model.recompute=selective` (set by Dots1ForCausalLM.recompute)
        self.selective_context = selective_context_fn(cfg.moe_intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = Dots1MoE(cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok,
                                cfg.moe_intermediate_size, cfg.n_shared_experts, cfg.routed_scaling_factor,
                                cfg.norm_topk_prob, experts_backend, aux_loss_coef, expert_range)
        else:
            self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask=None):
        return self._selective(self._forward, x, cos, sin, mask)

    def _forward(self, x, cos, sin, mask=None):
        x = self.attention_block(x, cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _selective(self, fn, *args):
        """fn(*args), under selective activation checkpointing (anneal.model.recompute) when it is on
        in training. Inside the layer's methods, so a compiled layer traces the checkpoint too."""
        if self.selective and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
                                                     context_fn=self.selective_context)
        return fn(*args)

    def attention_block(self, x, cos, sin, mask=None):
        return x + self.self_attn(self.input_layernorm(x), cos, sin, mask)

    def moe_front(self, x, cos, sin, mask=None):
        """An MoE layer up to its expert all-to-all, for the paired schedule
        (`anneal.train.paired_schedule`): the attention block, then the MoE's work before dispatch.
        -> (h, x_sorted, tokens_per_expert, order, topk_weight, shared, aux); the layer's output is
        then `moe_output(h, rows back from the experts, order, topk_weight, shared)`."""
        return self._selective(self._moe_front, x, cos, sin, mask)

    def _moe_front(self, x, cos, sin, mask=None):
        h = self.attention_block(x, cos, sin, mask)
        return (h, *self.mlp.dispatch_inputs(self.post_attention_layernorm(h)))

    def moe_output(self, h: torch.Tensor, back: torch.Tensor, order: torch.Tensor, topk_weight: torch.Tensor,
                   shared: torch.Tensor | None) -> torch.Tensor:
        """The layer's output from the expert rows that came back (paired schedule, EP > 1): the
        weighted combine and the residual add, as `forward` ends; compiled by `compile_layers`."""
        return h + Dots1MoE.combine(back, order, topk_weight, shared, h.shape)

    def moe_experts(self, recv: torch.Tensor, plan) -> torch.Tensor:
        """The experts this rank holds over the rows it received (paired schedule, EP > 1): a method
        so that `compile_layers` compiles it with the rest of the layer."""
        return self._selective(self.mlp.local_experts, recv, plan)

    @property
    def ep_groups(self):
        """The EP groups an MoE layer's rows are dispatched over (`Dots1MoE.ep_groups`); None for a
        dense layer or experts all held here: the paired schedule splits a layer only when set."""
        return self.mlp.ep_groups if isinstance(self.mlp, Dots1MoE) else None

    def take_aux_loss(self) -> torch.Tensor | None:
        """An MoE layer's balance loss of the last forward, cleared (`Dots1MoE.take_aux_loss`)."""
        return self.mlp.take_aux_loss() if isinstance(self.mlp, Dots1MoE) else None


class Dots1Model(nn.Module):
    def __init__(self, cfg: Dots1Config, experts_backend: str, aux_loss_coef: float,
                 expert_range: tuple[int, int] | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, experts_backend, aux_loss_coef, expert_range)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Dots1ForCausalLM(nn.Module):
    """`expert_range=(start, stop)` builds a model holding only those routed experts of every MoE
    layer (one rank's share under expert parallelism); default: all of them. `document_mask`
    keeps attention inside each packed document (`build_document_mask`); off, attention is causal
    over the whole packed row. `recompute`: none | selective | full (anneal.model.recompute)."""

    def __init__(self, cfg: Dots1Config, experts_backend: str = "torch", aux_loss_coef: float = 0.0,
                 recompute: str = "none", expert_range: tuple[int, int] | None = None,
                 document_mask: bool = False):
        super().__init__()
        self.config = cfg
        self.model = Dots1Model(cfg, experts_backend, aux_loss_coef, expert_range)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.recompute = recompute
        self.document_mask = document_mask

    @property
    def recompute(self) -> str:
        return self._recompute

    @recompute.setter
    def recompute(self, mode: str) -> None:
        self._recompute = check_mode(mode)
        for layer in self.model.layers:
            layer.selective = mode == "selective"

    @property
    def gradient_checkpointing(self) -> bool:
        """Older spelling of `recompute == "full"` (kept for callers that set a bool)."""
        return self.recompute == "full"

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.recompute = "full" if on else "none"

    # -- forward --------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, S] -> final-normed hidden states [B, S, H] in the model's compute dtype."""
        x, cos, sin, mask = self.embed(input_ids, position_ids)
        for layer in self.model.layers:
            x = self.checkpointed(layer, x, cos, sin, mask)
        return self.model.norm(x)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        """input_ids [B, S] -> (embeddings, cos, sin, mask): the first hidden state and what every layer
        takes besides it. position_ids restart at 0 at each packed document: they move RoPE, and with
        `document_mask` they also confine attention to each document (the mask is built here,
        outside the compiled layers, once for all of them). None: one document per row."""
        bsz, seq = input_ids.shape
        mask = None
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).expand(bsz, seq)
        elif self.document_mask:
            mask = build_document_mask(position_ids, flex=position_ids.is_cuda)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        return x, cos, sin, mask

    def checkpointed(self, fn, *args):
        """fn(*args), under full activation checkpointing when `recompute` is "full" in training (a
        decoder layer, or a piece of one in the paired schedule); "selective" lives in the layer."""
        if self.recompute == "full" and self.training:
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, V] (in the model's compute dtype)."""
        return self.lm_head(self.hidden_states(input_ids, position_ids))

    def token_losses(self, input_ids: torch.Tensor, targets: torch.Tensor,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token next-token cross-entropy [B, S] in fp32 (the loss is fp32 whatever the compute
        dtype). The head and the loss are one compiled region under `compile_layers`, so the fp32
        upcast of the logits fuses into the softmax instead of materializing [B, S, V] in fp32."""
        return self._head_loss(self.hidden_states(input_ids, position_ids), targets)

    def losses_from_last_layer(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token losses [B, S] from the last decoder layer's output (final norm, head, loss)."""
        return self._head_loss(self.model.norm(x), targets)

    def _head_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        return losses.view(targets.shape)

    def compile_layers(self, backend: str = "inductor") -> None:
        """Regional compilation (as torchtitan does it): each decoder layer, and the head + loss,
        compiled on their own. Layers of one kind share one graph; parameter names and the state
        dict are unchanged (`nn.Module.compile` works in place). `backend` is torch.compile's
        (tests use "aot_eager" to check tracing without code generation).
        `recompute=selective` traces its checkpoint inside each layer's graph; the router's load
        count (an in-place update of a buffer outside the checkpoint) is then done once, in the
        forward, not again when the backward recomputes the layer (without this flag Dynamo
        breaks the graph there and runs the layer eagerly)."""
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        for layer in self.model.layers:
            layer.compile(backend=backend)
            if isinstance(layer.mlp, Dots1MoE):  # what the paired schedule calls instead of forward under EP
                layer.moe_front = torch.compile(layer.moe_front, backend=backend)
                layer.moe_experts = torch.compile(layer.moe_experts, backend=backend)
                layer.moe_output = torch.compile(layer.moe_output, backend=backend)
        self._head_loss = torch.compile(self._head_loss, backend=backend)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE layers' sequence-wise balance losses from the last forward (or None)."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, Dots1MoE) and m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    # -- MoE bookkeeping ------------------------------------------------------------------------
    def routers(self) -> dict[int, Router]:
        return {i: layer.mlp.gate for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, Dots1MoE)}

    def to_dtype(self, dtype: torch.dtype) -> "Dots1ForCausalLM":
        """Cast parameters to `dtype` (the compute weights of the mixed-precision policy); the routers'
        correction bias and load counters stay fp32 (`moe.router.Router._apply`)."""
        return self.to(dtype)

    def set_aux_loss_coef(self, coef: float) -> None:
        for layer in self.model.layers:
            if isinstance(layer.mlp, Dots1MoE):
                layer.mlp.aux_loss_coef = coef

    @property
    def expert_range(self) -> tuple[int, int]:
        """The routed experts [start, stop) every MoE layer holds: all of them, or one rank's share
        (built with `expert_range=`, or sharded by `moe.ep.shard_experts`)."""
        for layer in self.model.layers:
            if isinstance(layer.mlp, Dots1MoE):
                return layer.mlp.experts.expert_range
        return 0, self.config.n_routed_experts

    # -- init -----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Random init as transformers does it: N(0, initializer_range) for matrices, ones for norms,
        zero correction bias. Deterministic for a given seed."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        for router in self.routers().values():
            router.e_score_correction_bias.zero_()
