"""The dots1 architecture as a typed config, read from / written to an HF ``config.json``.

One place knows the HF field names; the model, the loader and the exporter use this class.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from anneal.errors import AnnealError

# Keys the released dots.llm1 config.json carries that we do not model but keep on export.
_PASSTHROUGH_DEFAULTS = {
    "architectures": ["Dots1ForCausalLM"],
    "model_type": "dots1",
    "torch_dtype": "bfloat16",
    "moe_layer_freq": 1,
    "scoring_func": "noaux_tc",
    "sliding_window": None,
    "use_cache": True,
    "attention_dropout": 0.0,
}


@dataclass
class Dots1Config:
    vocab_size: int = 152064
    hidden_size: int = 4096
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 62
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    n_shared_experts: int = 2
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = 151643
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self, source: str = "model config") -> None:
        def bad(field: str, why: str) -> AnnealError:
            return AnnealError(f"{source}: field '{field}' {why}")

        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "moe_intermediate_size", "intermediate_size"):
            if int(getattr(self, f)) <= 0:
                raise bad(f, f"must be positive, got {getattr(self, f)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"({self.num_key_value_heads}) must divide "
                      f"num_attention_heads ({self.num_attention_heads})")
        if self.n_routed_experts > 0 and not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise bad("num_experts_per_tok", f"must be in 1..n_routed_experts ({self.n_routed_experts}), "
                      f"got {self.num_experts_per_tok}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"must be in 0..num_hidden_layers, got {self.first_k_dense_replace}")
        if self.n_group != 1 or self.topk_group != 1:
            raise bad("n_group", "group-limited routing (n_group > 1) is not supported; dots1 uses n_group=1")
        if self.hidden_act != "silu":
            raise bad("hidden_act", f"must be 'silu' (SwiGLU), got {self.hidden_act!r}")

    # -- derived ------------------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count (total, or active per token) without building the model."""
        h, attn = self.hidden_size, self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_attn = h * attn * 2 + h * kv * 2 + 2 * self.head_dim + 2 * h
        total = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        for layer in range(self.num_hidden_layers):
            total += per_attn
            if self.is_moe_layer(layer):
                n_exp = self.num_experts_per_tok if active else self.n_routed_experts
                total += 3 * h * self.moe_intermediate_size * n_exp
                total += 3 * h * self.shared_intermediate_size + self.n_routed_experts * h
            else:
                total += 3 * h * self.intermediate_size
        return total

    def train_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs of one training token (forward + backward): 6 × active non-embedding
        parameters + 12 × layers × attention width × seq_len (causal attention counted whole, as
        the PaLM/Megatron MFU convention does)."""
        active = self.num_parameters(active=True) - self.vocab_size * self.hidden_size  # embedding lookup is free
        attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6.0 * active + attn

    # -- HF config.json -----------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "Dots1Config":
        if d.get("model_type") != "dots1":
            raise AnnealError(f"{source}: model_type is {d.get('model_type')!r}, not 'dots1'. "
                              "This workbench anneals dots.llm1-architecture checkpoints only; "
                              "point `checkpoint` at a dots1 folder.")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if isinstance(rope, dict) and rope.get("rope_type", "default") not in ("default", None):
            raise AnnealError(f"{source}: rope scaling {rope.get('rope_type')!r} is not supported")
        if "rope_theta" not in kw and isinstance(rope, dict) and "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if kw.get("head_dim") is None:
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if kw.get("num_key_value_heads") is None:
            kw["num_key_value_heads"] = d["num_attention_heads"]
        layer_types = d.get("layer_types") or [
            "sliding_attention" if i >= d.get("max_window_layers", d["num_hidden_layers"]) else "full_attention"
            for i in range(d["num_hidden_layers"])]
        if d.get("sliding_window") is not None and "sliding_attention" in layer_types:
            raise AnnealError(f"{source}: sliding-window attention is not supported (dots1 uses full attention); "
                              "set sliding_window: null")
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        for opt in ("n_shared_experts", "n_routed_experts", "num_experts_per_tok"):
            if kw.get(opt) is None:
                kw[opt] = 0
        try:
            cfg = cls(**kw)
        except AnnealError as e:
            raise AnnealError(f"{source}: {e}") from None
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "Dots1Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise AnnealError(f"{path}: missing. A checkpoint folder needs config.json") from None
        except json.JSONDecodeError as e:
            raise AnnealError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self, extra: dict | None = None) -> dict:
        d = dict(_PASSTHROUGH_DEFAULTS)
        d.update(asdict(self))
        d["rope_scaling"] = None
        d["max_window_layers"] = self.num_hidden_layers
        d.update(extra or {})
        return d
