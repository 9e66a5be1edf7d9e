"""The mapping between Hugging Face dots1 checkpoints and our model: one *plan* for every tensor.

Our `Dots1ForCausalLM` uses transformers' parameter names except for the routed experts, which
are stacked per MoE layer:

    HF file (per expert e)                               ours (stacked)
    mlp.experts.{e}.gate_proj.weight  [I, H]   ──T──▶    mlp.experts.w_gate_up[e, :, :I]   [E, H, 2I]
    mlp.experts.{e}.up_proj.weight    [I, H]   ──T──▶    mlp.experts.w_gate_up[e, :, I:]
    mlp.experts.{e}.down_proj.weight  [H, I]   ──T──▶    mlp.experts.w_down[e]             [E, I, H]

One *plan* (`hf_weight_plan`) lists every HF tensor the config implies, with its expected shape
and where it lands in our state dict; the lazy loader (`anneal.checkpoints.hf_load`), the
in-memory mapping (`hf_to_stacked`, `stacked_to_hf`) and the exporter
(`anneal.checkpoints.hf_export`) all use it, so the three cannot disagree.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from anneal.errors import AnnealError
from anneal.model.config import Dots1Config

log = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Tensors some exporters write that carry no weights; tolerated on load with a warning.
IGNORABLE_PATTERNS = (
    re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
    re.compile(r"(^|\.)rotary_emb\.(cos|sin)_cached$"),
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_SHARED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight$")


# ---------------------------------------------------------------------------------------------
# The plan: every HF tensor name -> (expected shape, our target, expert slice)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFSlot:
    """Where one HF tensor lands in our state dict.

    `expert` is the *local* expert index (global index minus the range start) and `part` is
    "gate" | "up" | "down" for routed experts; both are None for tensors copied as they are.
    """
    target: str
    shape: tuple[int, ...]
    expert: int | None = None
    part: str | None = None


def expert_range_or_all(cfg: Dots1Config, expert_range: tuple[int, int] | None) -> tuple[int, int]:
    n = cfg.n_routed_experts
    if expert_range is None:
        return 0, n
    try:
        start, stop = (int(v) for v in expert_range)
    except (TypeError, ValueError):
        raise AnnealError(f"expert_range must be a pair (start, stop), got {expert_range!r}") from None
    if not 0 <= start < stop <= n:
        raise AnnealError(f"expert_range ({start}, {stop}) must satisfy 0 <= start < stop <= "
                          f"n_routed_experts ({n})")
    return start, stop


def hf_weight_plan(cfg: Dots1Config, expert_range: tuple[int, int] | None = None) -> dict[str, HFSlot]:
    """All HF tensor names a dots1 checkpoint with config `cfg` holds (restricted to the routed
    experts in `expert_range`), each with its expected shape and its place in our model."""
    start, stop = expert_range_or_all(cfg, expert_range)
    h, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    plan: dict[str, HFSlot] = {}

    def add(name: str, *shape: int) -> None:
        plan[name] = HFSlot(name, tuple(shape))

    add("model.embed_tokens.weight", cfg.vocab_size, h)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        add(p + "input_layernorm.weight", h)
        add(p + "post_attention_layernorm.weight", h)
        add(p + "self_attn.q_proj.weight", q_out, h)
        add(p + "self_attn.k_proj.weight", kv_out, h)
        add(p + "self_attn.v_proj.weight", kv_out, h)
        add(p + "self_attn.o_proj.weight", h, q_out)
        if cfg.attention_bias:
            add(p + "self_attn.q_proj.bias", q_out)
            add(p + "self_attn.k_proj.bias", kv_out)
            add(p + "self_attn.v_proj.bias", kv_out)
            add(p + "self_attn.o_proj.bias", h)
        add(p + "self_attn.q_norm.weight", hd)
        add(p + "self_attn.k_norm.weight", hd)
        if cfg.is_moe_layer(layer):
            inter = cfg.moe_intermediate_size
            add(p + "mlp.gate.weight", cfg.n_routed_experts, h)
            add(p + "mlp.gate.e_score_correction_bias", cfg.n_routed_experts)
            for e in range(start, stop):
                q = f"{p}mlp.experts.{e}."
                plan[q + "gate_proj.weight"] = HFSlot(p + "mlp.experts.w_gate_up", (inter, h), e - start, "gate")
                plan[q + "up_proj.weight"] = HFSlot(p + "mlp.experts.w_gate_up", (inter, h), e - start, "up")
                plan[q + "down_proj.weight"] = HFSlot(p + "mlp.experts.w_down", (h, inter), e - start, "down")
            if cfg.n_shared_experts > 0:
                s = cfg.shared_intermediate_size
                add(p + "mlp.shared_experts.gate_proj.weight", s, h)
                add(p + "mlp.shared_experts.up_proj.weight", s, h)
                add(p + "mlp.shared_experts.down_proj.weight", h, s)
        else:
            add(p + "mlp.gate_proj.weight", cfg.intermediate_size, h)
            add(p + "mlp.up_proj.weight", cfg.intermediate_size, h)
            add(p + "mlp.down_proj.weight", h, cfg.intermediate_size)
    add("model.norm.weight", h)
    if not cfg.tie_word_embeddings:
        add("lm_head.weight", cfg.vocab_size, h)
    return plan


def stacked_shapes(cfg: Dots1Config, expert_range: tuple[int, int] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of our state-dict tensors the plan writes into (stacked experts included)."""
    start, stop = expert_range_or_all(cfg, expert_range)
    n_local, inter, h = stop - start, cfg.moe_intermediate_size, cfg.hidden_size
    out: dict[str, tuple[int, ...]] = {}
    for slot in hf_weight_plan(cfg, expert_range).values():
        if slot.part is None:
            out[slot.target] = slot.shape
        elif slot.target.endswith("w_gate_up"):
            out[slot.target] = (n_local, h, 2 * inter)
        else:
            out[slot.target] = (n_local, inter, h)
    return out


def is_ignorable(name: str, shape: tuple[int, ...] | None, cfg: Dots1Config) -> bool:
    """Tensors that hold no weights, tolerated on load."""
    return any(p.search(name) for p in IGNORABLE_PATTERNS) or _is_empty_shared_expert(name, shape, cfg)


def _is_empty_shared_expert(name: str, shape: tuple[int, ...] | None, cfg: Dots1Config) -> bool:
    # transformers builds zero-width shared experts when n_shared_experts == 0 and saves them:
    # the normal form of such a checkpoint, skipped without a warning.
    return cfg.n_shared_experts == 0 and bool(_SHARED_RE.match(name)) and shape is not None and 0 in shape


def _outside_expert_range(name: str, cfg: Dots1Config, start: int, stop: int) -> bool:
    m = _EXPERT_RE.match(name)
    return bool(m and cfg.is_moe_layer(int(m.group(1)))
                and 0 <= int(m.group(2)) < cfg.n_routed_experts and not start <= int(m.group(2)) < stop)


def _and_more(names: list[str]) -> str:
    """' (and 3 more)' after the first of `names` named in a message; '' for one name."""
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def check_names(present: Mapping[str, tuple[int, ...] | None], plan: Mapping[str, HFSlot],
                 cfg: Dots1Config, expert_range: tuple[int, int], where: str) -> None:
    """Raise on missing / unexpected tensors; warn on ignorable ones."""
    missing = [n for n in plan if n not in present]
    if missing:
        raise AnnealError(
            f"{where}: tensor '{missing[0]}' is missing{_and_more(missing)}. The checkpoint does not match its "
            "config.json (wrong folder, an incomplete download, or a config edited by hand); "
            "re-download or re-export the checkpoint.")
    ignored, unexpected = [], []
    for name, shape in present.items():
        if name in plan or _outside_expert_range(name, cfg, *expert_range):
            continue
        if _is_empty_shared_expert(name, shape, cfg):
            continue
        (ignored if is_ignorable(name, shape, cfg) else unexpected).append(name)
    if unexpected:
        raise AnnealError(
            f"{where}: unexpected tensor '{unexpected[0]}'{_and_more(unexpected)}: config.json does not call for it. "
            "The config probably does not match the weights (e.g. num_hidden_layers, "
            "n_routed_experts, first_k_dense_replace or n_shared_experts); fix config.json.")
    if ignored:
        warnings.warn(f"{where}: ignoring {len(ignored)} tensor(s) that hold no weights, e.g. '{ignored[0]}'",
                      stacklevel=3)


def check_shape(name: str, found: tuple[int, ...], slot: HFSlot, where: str) -> None:
    if tuple(found) != slot.shape:
        raise AnnealError(f"{where}: tensor '{name}' has shape {list(found)}, config.json implies "
                          f"{list(slot.shape)}. The config does not match the weights; fix config.json "
                          "or use the matching checkpoint.")


@torch.no_grad()
def write_slot(dest: torch.Tensor, slot: HFSlot, t: torch.Tensor, inter: int) -> None:
    if slot.part is None:
        dest.copy_(t)
    elif slot.part == "gate":
        dest[slot.expert, :, :inter].copy_(t.t())
    elif slot.part == "up":
        dest[slot.expert, :, inter:].copy_(t.t())
    else:
        dest[slot.expert].copy_(t.t())


def hf_to_stacked(get_tensor: Callable[[str], torch.Tensor], names: Iterable[str], cfg: Dots1Config, *,
                  expert_range: tuple[int, int] | None = None, dtype: torch.dtype | None = None,
                  source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map HF per-expert tensors to our state dict (stacked experts), in memory.

    `get_tensor(name)` returns one HF tensor (e.g. `hf_state_dict.__getitem__` or a
    `safe_open` handle's `get_tensor`); `names` are the tensor names available. Validates names
    and shapes like the loader (AnnealError naming `source` and the tensor). With `expert_range`
    only those experts are read and the stacked tensors have `stop - start` rows. `dtype`
    casts floating tensors except `e_score_correction_bias`, which stays fp32.
    """
    rng = expert_range_or_all(cfg, expert_range)
    plan = hf_weight_plan(cfg, rng)
    present = {n: (None if n in plan else tuple(get_tensor(n).shape)) for n in names}
    check_names(present, plan, cfg, rng, source)
    shapes = stacked_shapes(cfg, rng)
    out: dict[str, torch.Tensor] = {}
    for name, slot in plan.items():
        t = get_tensor(name)
        check_shape(name, tuple(t.shape), slot, source)
        if slot.target not in out:
            out_dtype = torch.float32 if slot.target.endswith("e_score_correction_bias") else (dtype or t.dtype)
            out[slot.target] = torch.empty(shapes[slot.target], dtype=out_dtype)
        write_slot(out[slot.target], slot, t, cfg.moe_intermediate_size)
    return out


def hf_producers(state_dict: Mapping[str, torch.Tensor], cfg: Dots1Config
                  ) -> dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]]:
    """HF name -> (shape, dtype, producer) for our state dict, without materializing anything."""
    inter = cfg.moe_intermediate_size
    out: dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]] = {}
    for name, t in state_dict.items():
        if name.endswith("mlp.experts.w_gate_up"):
            prefix = name[: -len("w_gate_up")]
            if t.shape[0] != cfg.n_routed_experts:
                raise AnnealError(
                    f"{name}: the model holds {t.shape[0]} of {cfg.n_routed_experts} routed experts "
                    "(an expert-parallel shard); gather all experts before exporting.")
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = ((inter, t.shape[1]), t.dtype,
                                                        lambda t=t, e=e: t[e, :, :inter].t())
                out[f"{prefix}{e}.up_proj.weight"] = ((inter, t.shape[1]), t.dtype,
                                                      lambda t=t, e=e: t[e, :, inter:].t())
        elif name.endswith("mlp.experts.w_down"):
            prefix = name[: -len("w_down")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = ((t.shape[2], t.shape[1]), t.dtype,
                                                        lambda t=t, e=e: t[e].t())
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied to model.embed_tokens.weight; HF files do not repeat it
        else:
            out[name] = (tuple(t.shape), t.dtype, lambda t=t: t)
    # transformers builds (and saves) zero-width shared experts when n_shared_experts == 0;
    # write them too so the folder loads in transformers without missing-weight warnings.
    if cfg.n_shared_experts == 0:
        dt = state_dict["model.embed_tokens.weight"].dtype
        h = cfg.hidden_size
        for layer in range(cfg.num_hidden_layers):
            if cfg.is_moe_layer(layer):
                p = f"model.layers.{layer}.mlp.shared_experts."
                for part, shape in (("gate", (0, h)), ("up", (0, h)), ("down", (h, 0))):
                    out[f"{p}{part}_proj.weight"] = (shape, dt, lambda shape=shape, dt=dt: torch.empty(shape, dtype=dt))
    return out


def stacked_to_hf(state_dict: Mapping[str, torch.Tensor], cfg: Dots1Config,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_stacked`: our state dict -> HF per-expert tensors (contiguous copies).
    `dtype` casts floating tensors except `e_score_correction_bias` (kept fp32)."""
    return {name: export_tensor(name, prod(), dtype)
            for name, (_, _, prod) in hf_producers(state_dict, cfg).items()}


def export_dtype(name: str, dt: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    if name.endswith("e_score_correction_bias"):
        return torch.float32
    if dtype is None or not dt.is_floating_point:
        return dt
    return dtype


def export_tensor(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=export_dtype(name, t.dtype, dtype)).contiguous().clone()

