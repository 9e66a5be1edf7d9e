"""Read and write Hugging Face dots1 checkpoints (config.json + safetensors) for our model.

Our `Dots1ForCausalLM` uses transformers' parameter names except for the routed experts, which
are stacked per MoE layer:

    HF file (per expert e)                               ours (stacked)
    mlp.experts.{e}.gate_proj.weight  [I, H]   ──T──▶    mlp.experts.w_gate_up[e, :, :I]   [E, H, 2I]
    mlp.experts.{e}.up_proj.weight    [I, H]   ──T──▶    mlp.experts.w_gate_up[e, :, I:]
    mlp.experts.{e}.down_proj.weight  [H, I]   ──T──▶    mlp.experts.w_down[e]             [E, I, H]

One *plan* (`hf_weight_plan`) lists every HF tensor the config implies, with its expected shape
and where it lands in our state dict; the lazy loader, the in-memory mapping (`hf_to_stacked`)
and the exporter all use it, so the three cannot disagree.

Loading never holds more than the model plus one checkpoint tensor: the model is built on the
meta device, materialized empty, and each tensor is read with `safe_open` and copied in place
(an expert's matrices straight into their slice of the stacked tensor).

Export writes the per-expert layout (what the hub files, vLLM, SGLang and transformers 4.x/5.x
read), sharded, into a temporary folder that replaces the target only when complete.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from anneal.errors import AnnealError
from anneal.model_config import Dots1Config

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


def _normalize_expert_range(cfg: Dots1Config, expert_range: tuple[int, int] | None) -> tuple[int, int]:
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
    start, stop = _normalize_expert_range(cfg, expert_range)
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
    start, stop = _normalize_expert_range(cfg, expert_range)
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


def _is_ignorable(name: str, shape: tuple[int, ...] | None, cfg: Dots1Config) -> bool:
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


def _check_names(present: Mapping[str, tuple[int, ...] | None], plan: Mapping[str, HFSlot],
                 cfg: Dots1Config, expert_range: tuple[int, int], where: str) -> None:
    """Raise on missing / unexpected tensors; warn on ignorable ones."""
    missing = [n for n in plan if n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise AnnealError(
            f"{where}: tensor '{missing[0]}' is missing{more}. The checkpoint does not match its "
            "config.json (wrong folder, an incomplete download, or a config edited by hand); "
            "re-download or re-export the checkpoint.")
    ignored, unexpected = [], []
    for name, shape in present.items():
        if name in plan or _outside_expert_range(name, cfg, *expert_range):
            continue
        if _is_empty_shared_expert(name, shape, cfg):
            continue
        (ignored if _is_ignorable(name, shape, cfg) else unexpected).append(name)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise AnnealError(
            f"{where}: unexpected tensor '{unexpected[0]}'{more}: config.json does not call for it. "
            "The config probably does not match the weights (e.g. num_hidden_layers, "
            "n_routed_experts, first_k_dense_replace or n_shared_experts); fix config.json.")
    if ignored:
        warnings.warn(f"{where}: ignoring {len(ignored)} tensor(s) that hold no weights, e.g. '{ignored[0]}'",
                      stacklevel=3)


def _check_shape(name: str, found: tuple[int, ...], slot: HFSlot, where: str) -> None:
    if tuple(found) != slot.shape:
        raise AnnealError(f"{where}: tensor '{name}' has shape {list(found)}, config.json implies "
                          f"{list(slot.shape)}. The config does not match the weights; fix config.json "
                          "or use the matching checkpoint.")


@torch.no_grad()
def _write(dest: torch.Tensor, slot: HFSlot, t: torch.Tensor, inter: int) -> None:
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
    rng = _normalize_expert_range(cfg, expert_range)
    plan = hf_weight_plan(cfg, rng)
    present = {n: (None if n in plan else tuple(get_tensor(n).shape)) for n in names}
    _check_names(present, plan, cfg, rng, source)
    shapes = stacked_shapes(cfg, rng)
    out: dict[str, torch.Tensor] = {}
    for name, slot in plan.items():
        t = get_tensor(name)
        _check_shape(name, tuple(t.shape), slot, source)
        if slot.target not in out:
            out_dtype = torch.float32 if slot.target.endswith("e_score_correction_bias") else (dtype or t.dtype)
            out[slot.target] = torch.empty(shapes[slot.target], dtype=out_dtype)
        _write(out[slot.target], slot, t, cfg.moe_intermediate_size)
    return out


def _hf_producers(state_dict: Mapping[str, torch.Tensor], cfg: Dots1Config
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
    return {name: _export_tensor(name, prod(), dtype)
            for name, (_, _, prod) in _hf_producers(state_dict, cfg).items()}


def _export_dtype(name: str, dt: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    if name.endswith("e_score_correction_bias"):
        return torch.float32
    if dtype is None or not dt.is_floating_point:
        return dt
    return dtype


def _export_tensor(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=_export_dtype(name, t.dtype, dtype)).contiguous().clone()


# ---------------------------------------------------------------------------------------------
# Finding the tensors of a folder
# ---------------------------------------------------------------------------------------------
def _safetensors_files(folder: Path) -> dict[Path, list[str] | None]:
    """Shard path -> tensor names the index assigns to it (None when there is no index)."""
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise AnnealError(f"{index}: not a valid safetensors index ({e!r}); it needs a 'weight_map' "
                              "of tensor name -> shard file. Re-download the checkpoint.") from None
        by_file: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            by_file.setdefault(folder / shard, []).append(name)
        for shard in by_file:
            if not shard.is_file():
                raise AnnealError(f"{index}: points to shard '{shard.name}', which is not in {folder}. "
                                  "The download is incomplete; download the checkpoint again "
                                  "(huggingface-cli download <repo> resumes missing files).")
        return dict(by_file)
    single = folder / SAFE_WEIGHTS_NAME
    if single.is_file():
        return {single: None}
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = (f" Found {others[:3]} but no {SAFE_WEIGHTS_INDEX_NAME} saying which tensor is where."
            if others else "")
    bins = sorted(p.name for p in folder.glob("*.bin"))
    if bins:
        hint += (f" Found {bins[:3]}: PyTorch .bin checkpoints are not read; convert them with "
                 "transformers (`from_pretrained(...).save_pretrained(dst)`).")
    raise AnnealError(f"{folder}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}.{hint} "
                      "A checkpoint folder needs config.json and safetensors weights.")


@dataclass
class _TensorInfo:
    file: Path
    shape: tuple[int, ...]


def _scan(folder: Path) -> dict[str, _TensorInfo]:
    """Tensor name -> (file, shape), from the safetensors headers only (no tensor data read)."""
    from safetensors import safe_open

    found: dict[str, _TensorInfo] = {}
    for path, names in _safetensors_files(folder).items():
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                keys = set(f.keys())
                for k in keys:
                    if k in found:
                        raise AnnealError(f"{path}: tensor '{k}' is also in {found[k].file.name}; "
                                          "a checkpoint must hold each tensor once.")
                    found[k] = _TensorInfo(path, tuple(f.get_slice(k).get_shape()))
        except AnnealError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise AnnealError(f"{path}: cannot read safetensors header ({e}). The file is corrupt or "
                              "truncated; download it again.") from None
        if names is not None:
            absent = [n for n in names if n not in keys]
            if absent:
                raise AnnealError(f"{folder / SAFE_WEIGHTS_INDEX_NAME}: says tensor '{absent[0]}' is in "
                                  f"{path.name}, but that file does not hold it. Re-download the checkpoint.")
    return found


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
def _materialize(cfg: Dots1Config, *, dtype: torch.dtype, device: str | torch.device, experts_backend: str,
                 expert_range: tuple[int, int]):
    from anneal.model import Dots1ForCausalLM
    from moe.experts import GroupedExperts
    from moe.layer import Dots1MoE

    with torch.device("meta"):
        model = Dots1ForCausalLM(cfg, experts_backend=experts_backend)
        start, stop = expert_range
        if (start, stop) != (0, cfg.n_routed_experts):
            for layer in model.model.layers:
                if isinstance(layer.mlp, Dots1MoE):
                    layer.mlp.experts = GroupedExperts(stop - start, cfg.hidden_size,
                                                       cfg.moe_intermediate_size, experts_backend)
    model.to(dtype)
    for router in model.routers().values():  # router buffers stay fp32 whatever the model dtype
        router.e_score_correction_bias = router.e_score_correction_bias.float()
        router.expert_load = router.expert_load.float()
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty replaces parameters one by one, which unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    for router in model.routers().values():
        router.expert_load.zero_()  # non-persistent: not in the checkpoint
    model.expert_range = expert_range
    return model


def load_hf_checkpoint(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                       experts_backend: str = "torch", device: str | torch.device = "cpu",
                       expert_range: tuple[int, int] | None = None):
    """Load an HF dots1 folder (config.json + model.safetensors or an index and shards) into
    `anneal.model.Dots1ForCausalLM`. Returns `(model, cfg)`; the model is in eval mode.

    Reads lazily with `safe_open`: peak memory is the model plus one checkpoint tensor.
    `dtype` is the model dtype (`e_score_correction_bias` stays fp32). `expert_range=(start,
    stop)` reads only those routed experts: the stacked expert tensors then have `stop - start`
    rows and `model.expert_range` records the range. Such a partial model runs only under
    expert parallelism: `moe.ep.shard_experts` (which `anneal.ds_engine.DeepSpeedEngine` calls)
    installs the dispatch that sends each token to the rank holding its expert; the trainer
    loads each rank's range this way (`anneal.trainer.rank_expert_range`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AnnealError(f"{folder}: checkpoint folder does not exist (or is not a folder). Pass a folder "
                          "holding config.json and *.safetensors, or a catalog name.")
    cfg = Dots1Config.from_json(folder / "config.json")
    rng = _normalize_expert_range(cfg, expert_range)
    plan = hf_weight_plan(cfg, rng)
    tensors = _scan(folder)
    _check_names({n: i.shape for n, i in tensors.items()}, plan, cfg, rng, str(folder))
    for name, slot in plan.items():
        _check_shape(name, tensors[name].shape, slot, str(tensors[name].file))

    model = _materialize(cfg, dtype=dtype, device=device, experts_backend=experts_backend, expert_range=rng)
    params = model.state_dict(keep_vars=True)
    missing_targets = {s.target for s in plan.values()} - set(params)
    if missing_targets:  # the plan and the model disagree: a bug, not bad input
        raise RuntimeError(f"hf_io plan names {sorted(missing_targets)[:3]} that the model does not have")

    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(tensors[name].file, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                slot = plan[name]
                _write(params[slot.target], slot, f.get_tensor(name), cfg.moe_intermediate_size)
    model.eval()
    return model, cfg


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def export_config_dict(cfg: Dots1Config, dtype: torch.dtype | None = torch.bfloat16,
                       extra: dict | None = None) -> dict:
    """config.json for an export: `cfg.to_hf_dict()` plus the keys both transformers 4.x
    (top-level `rope_theta`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`) read."""
    d = cfg.to_hf_dict()
    d["rope_theta"] = cfg.rope_theta
    d.setdefault("rope_scaling", None)
    d["rope_parameters"] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if dtype is not None:
        d["torch_dtype"] = d["dtype"] = _dtype_name(dtype)
    d.update(extra or {})
    return d


def _generation_config(cfg: Dots1Config) -> dict:
    d = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key) is not None:
            d[key] = getattr(cfg, key)
    return d


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files found in `src` (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, vocab/merges, chat template, ...) into `dst`; returns their names.
    Raises AnnealError when `src` holds none of them."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise AnnealError(f"{src}: tokenizer folder does not exist")
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not copied:
        raise AnnealError(f"{src}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES[:6])}, ...). "
                          "Pass the checkpoint folder the model was loaded from as tokenizer_dir.")
    dst.mkdir(parents=True, exist_ok=True)
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied


def _write_json(path: Path, d: dict) -> None:
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def _split_into_shards(metas: dict[str, torch.Tensor], max_shard_size: int | str
                       ) -> tuple[dict[str, list[str]], bool]:
    """filename -> tensor names, and whether the export is sharded (needs an index)."""
    try:
        from huggingface_hub import split_torch_state_dict_into_shards
    except ImportError:  # very old huggingface_hub: one file
        return {SAFE_WEIGHTS_NAME: list(metas)}, False
    split = split_torch_state_dict_into_shards(metas, max_shard_size=max_shard_size,
                                               filename_pattern="model{suffix}.safetensors")
    return dict(split.filename_to_tensors), split.is_sharded


def _write_weights(model, folder: Path, dtype: torch.dtype | None, max_shard_size: int | str) -> None:
    from safetensors.torch import save_file

    cfg: Dots1Config = model.config
    producers = _hf_producers(model.state_dict(), cfg)
    expected = set(hf_weight_plan(cfg))
    extra = sorted(n for n in set(producers) - expected if not _is_ignorable(
        n, producers[n][0], cfg))
    absent = sorted(expected - set(producers))
    if extra or absent:
        raise AnnealError(f"export: the model's state dict does not match its config "
                          f"(extra: {extra[:3]}, missing: {absent[:3]})")
    metas = {n: torch.empty(shape, dtype=_export_dtype(n, dt, dtype), device="meta")
             for n, (shape, dt, _) in producers.items()}
    shards, sharded = _split_into_shards(metas, max_shard_size)
    total = 0
    for filename, names in shards.items():
        tensors = {n: _export_tensor(n, producers[n][2](), dtype) for n in names}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        del tensors
    if sharded:
        weight_map = {n: f for f, names in shards.items() for n in names}
        _write_json(folder / SAFE_WEIGHTS_INDEX_NAME,
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def export_hf_checkpoint(model, folder: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
                         dtype: torch.dtype | None = torch.bfloat16, max_shard_size: int | str = "2GB",
                         extra_config: dict | None = None, overwrite: bool = False,
                         extra_files: Mapping[str, str | bytes] | None = None) -> Path:
    """Write `model` (our Dots1ForCausalLM) as an HF folder that transformers, vLLM and SGLang
    load: config.json, generation_config.json, per-expert safetensors (sharded with
    model.safetensors.index.json when over `max_shard_size`), tokenizer files from
    `tokenizer_dir`. Floating weights are cast to `dtype` (None keeps them), except
    `e_score_correction_bias`, which stays fp32. `extra_files` (file name -> text or bytes, e.g.
    the anneal's metadata JSON) are written into the folder inside the same atomic step.

    Atomic: everything is written into a hidden temporary folder next to `folder`, which then
    replaces `folder` with one rename; on any error the temporary folder is removed and
    `folder` is untouched. Refuses a non-empty existing `folder` unless `overwrite=True`.
    Returns the folder's path.
    """
    folder = Path(folder).absolute()
    if folder.exists():
        if not folder.is_dir():
            raise AnnealError(f"{folder}: exists and is not a folder; choose another export path")
        if any(folder.iterdir()) and not overwrite:
            raise AnnealError(f"{folder}: already exists and is not empty; choose another path or pass "
                              "overwrite=True to replace it")
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise AnnealError(f"{tokenizer_dir}: tokenizer folder does not exist")
    for name in extra_files or {}:
        if Path(name).name != name or name in ("", ".", "..") or name.endswith(".safetensors") \
                or name in ("config.json", "generation_config.json", SAFE_WEIGHTS_INDEX_NAME):
            raise AnnealError(f"export: extra file name {name!r} must be a plain file name that is not "
                              "config.json, generation_config.json or a weights file")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)
        cfg: Dots1Config = model.config
        _write_json(tmp / "config.json", export_config_dict(cfg, dtype, extra_config))
        _write_json(tmp / "generation_config.json", _generation_config(cfg))
        _write_weights(model, tmp, dtype, max_shard_size)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        for f in tmp.iterdir():  # some writers create 0600 files; an export is for others to read
            os.chmod(f, 0o644)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content.encode() if isinstance(content, str) else bytes(content))
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder

