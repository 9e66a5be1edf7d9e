"""anneal.checkpoints.hf_load / hf_export / hf_layout: load transformers-saved dots1 folders into our model (same logits), export ours
so transformers loads it (same logits), sharding, dtypes, every bad-input error, atomic export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from anneal.checkpoints import hf_load  # noqa: E402
from anneal.errors import AnnealError  # noqa: E402
from anneal.checkpoints.hf_export import copy_tokenizer_files, export_hf_checkpoint  # noqa: E402
from anneal.checkpoints.hf_layout import hf_to_stacked, hf_weight_plan, stacked_to_hf  # noqa: E402
from anneal.checkpoints.hf_load import load_hf_checkpoint  # noqa: E402
from anneal.model.config import Dots1Config  # noqa: E402

VOCAB = 96

# name -> transformers Dots1Config kwargs (tiny; every structural variant the loader handles)
CONFIGS = {
    "mha_1dense_top2_shared1": dict(num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1,
                                    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1),
    "gqa_2dense_top6_shared2": dict(num_attention_heads=4, num_key_value_heads=2, first_k_dense_replace=2,
                                    n_routed_experts=12, num_experts_per_tok=6, n_shared_experts=2,
                                    num_hidden_layers=4),
    "gqa_noshared_top2": dict(num_attention_heads=4, num_key_value_heads=1, first_k_dense_replace=1,
                              n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=0),
    "mha_tied_top6": dict(num_attention_heads=2, num_key_value_heads=2, first_k_dense_replace=1,
                          n_routed_experts=8, num_experts_per_tok=6, n_shared_experts=2, tie_word_embeddings=True),
}


def hf_config(**over) -> "transformers.Dots1Config":
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
              num_hidden_layers=3, head_dim=16, norm_topk_prob=True, routed_scaling_factor=2.5,
              n_group=1, topk_group=1, rms_norm_eps=1e-5, max_position_embeddings=64,
              rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, sliding_window=None,
              eos_token_id=1, bos_token_id=0)
    kw.update(over)
    cfg = transformers.Dots1Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def make_hf_model(seed: int = 0, **over):
    torch.manual_seed(seed)
    model = transformers.Dots1ForCausalLM(hf_config(**over)).eval()
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.uniform_(0.5, 1.5)  # norms: away from 1 so a swapped norm shows
        else:
            p.normal_(0.0, 0.15)
    for m in model.modules():  # non-zero correction bias: selection differs from plain top-k
        if hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias.copy_(torch.linspace(-0.4, 0.4, m.e_score_correction_bias.numel()))
    return model


def tokens(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 11), generator=g)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """config name -> (folder saved by transformers, reference logits)."""
    out = {}
    for name, over in CONFIGS.items():
        model = make_hf_model(**over)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        with torch.no_grad():
            out[name] = (folder, model(tokens()).logits)
    return out


@pytest.fixture(scope="module")
def base_folder(hf_folders):
    return hf_folders["mha_1dense_top2_shared1"][0]


def our_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens())


def hf_logits(folder) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens()).logits


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---------------------------------------------------------------------------------------------
# parity in both directions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_matches_transformers(hf_folders, name):
    folder, ref = hf_folders[name]
    model, cfg = load_hf_checkpoint(folder)
    assert not model.training
    assert isinstance(cfg, Dots1Config) and cfg.n_shared_experts == CONFIGS[name]["n_shared_experts"]
    for router in model.routers().values():
        assert router.e_score_correction_bias.abs().sum() > 0  # the bias was loaded, not zero-init
        assert router.expert_load.dtype == torch.float32 and not router.expert_load.any()
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(our_logits(model), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_loads_in_transformers(hf_folders, tmp_path, name):
    folder, ref = hf_folders[name]
    model, _ = load_hf_checkpoint(folder)
    out = export_hf_checkpoint(model, tmp_path / "export", dtype=torch.float32)
    assert out == (tmp_path / "export").absolute()
    torch.testing.assert_close(hf_logits(out), ref, atol=1e-4, rtol=0)
    # same tensor names, shapes and values as the folder transformers wrote
    assert load_file(out / "model.safetensors").keys() == load_file(folder / "model.safetensors").keys()
    original = load_file(folder / "model.safetensors")
    for k, v in load_file(out / "model.safetensors").items():
        torch.testing.assert_close(v, original[k], atol=0, rtol=0)


def test_export_config_readable_by_transformers_4_and_5(base_folder, tmp_path):
    model, cfg = load_hf_checkpoint(base_folder)
    out = export_hf_checkpoint(model, tmp_path / "e", extra_config={"custom_key": 7})
    d = json.loads((out / "config.json").read_text())
    assert d["rope_theta"] == cfg.rope_theta  # transformers 4.x
    assert d["rope_parameters"] == {"rope_theta": cfg.rope_theta, "rope_type": "default"}  # 5.x
    assert d["torch_dtype"] == d["dtype"] == "bfloat16"
    assert d["model_type"] == "dots1" and d["architectures"] == ["Dots1ForCausalLM"]
    assert d["custom_key"] == 7
    hc = transformers.AutoConfig.from_pretrained(out)
    assert hc.rope_parameters["rope_theta"] == cfg.rope_theta and hc.head_dim == cfg.head_dim
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg.eos_token_id and gen["bos_token_id"] == cfg.bos_token_id
    assert Dots1Config.from_json(out / "config.json") == cfg


def test_sharded_export_round_trips(base_folder, tmp_path):
    model, _ = load_hf_checkpoint(base_folder)
    out = export_hf_checkpoint(model, tmp_path / "sharded", dtype=torch.float32, max_shard_size="8KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(hf_weight_plan(model.config))
    again, _ = load_hf_checkpoint(out)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(hf_logits(out), our_logits(model), atol=1e-4, rtol=0)


def test_bf16_export_keeps_bias_fp32(base_folder, tmp_path):
    model, _ = load_hf_checkpoint(base_folder)
    out = export_hf_checkpoint(model, tmp_path / "bf16")  # default dtype: bfloat16
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    for k, dt in dtypes.items():
        assert dt == ("F32" if k.endswith("e_score_correction_bias") else "BF16"), k
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    bias = load_file(out / "model.safetensors")["model.layers.1.mlp.gate.e_score_correction_bias"]
    torch.testing.assert_close(bias, model.routers()[1].e_score_correction_bias, atol=0, rtol=0)


def test_load_in_bf16_keeps_router_buffers_fp32(base_folder):
    model, _ = load_hf_checkpoint(base_folder, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.experts.w_gate_up.dtype == torch.bfloat16
    for router in model.routers().values():
        assert router.e_score_correction_bias.dtype == torch.float32
        assert router.expert_load.dtype == torch.float32
    assert torch.isfinite(our_logits(model)).all()


def test_export_copies_tokenizer_files(base_folder, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "merges.txt"):
        (tok / name).write_text(f"{name} contents")
    (tok / "README.md").write_text("not a tokenizer file")
    model, _ = load_hf_checkpoint(base_folder)
    out = export_hf_checkpoint(model, tmp_path / "with_tok", tokenizer_dir=tok,
                               extra_files={"anneal_meta.json": '{"lr": 1e-5}', "notes.bin": b"\x00"})
    assert json.loads((out / "anneal_meta.json").read_text()) == {"lr": 1e-5}
    assert (out / "notes.bin").read_bytes() == b"\x00"
    for bad in ("config.json", "sub/x.json", "model.safetensors"):
        with pytest.raises(AnnealError, match="extra file name"):
            export_hf_checkpoint(model, tmp_path / "bad", extra_files={bad: "x"})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "merges.txt"):
        assert (out / name).read_text() == f"{name} contents"
    assert not (out / "README.md").exists()
    with pytest.raises(AnnealError, match="no tokenizer files"):
        copy_tokenizer_files(tmp_path / "with_tok" / "..", tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# the pure mapping
# ---------------------------------------------------------------------------------------------
def test_hf_to_stacked_and_inverse_in_memory():
    hf = make_hf_model(**CONFIGS["gqa_2dense_top6_shared2"])
    cfg = Dots1Config.from_hf_dict(hf.config.to_dict())
    sd = {k: v for k, v in load_hf_state(hf).items()}
    ours = hf_to_stacked(sd.__getitem__, sd.keys(), cfg)
    inter = cfg.moe_intermediate_size
    w = ours["model.layers.2.mlp.experts.w_gate_up"]
    assert w.shape == (cfg.n_routed_experts, cfg.hidden_size, 2 * inter)
    torch.testing.assert_close(w[3, :, :inter], sd["model.layers.2.mlp.experts.3.gate_proj.weight"].T)
    torch.testing.assert_close(w[3, :, inter:], sd["model.layers.2.mlp.experts.3.up_proj.weight"].T)
    torch.testing.assert_close(ours["model.layers.2.mlp.experts.w_down"][3],
                               sd["model.layers.2.mlp.experts.3.down_proj.weight"].T)
    back = stacked_to_hf(ours, cfg)
    assert back.keys() == sd.keys()
    for k in sd:
        torch.testing.assert_close(back[k], sd[k], atol=0, rtol=0)
    # dtype cast keeps the bias fp32
    bf = stacked_to_hf(ours, cfg, dtype=torch.bfloat16)
    assert bf["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert bf["model.layers.2.mlp.gate.weight"].dtype == torch.bfloat16
    bf_in = hf_to_stacked(sd.__getitem__, sd.keys(), cfg, dtype=torch.bfloat16)
    assert bf_in["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert bf_in["model.layers.2.mlp.experts.w_down"].dtype == torch.bfloat16


def load_hf_state(hf_model) -> dict[str, torch.Tensor]:
    """The HF per-expert state dict transformers writes (round trip through save_pretrained)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        return load_file(Path(d) / "model.safetensors")


def test_expert_range_loads_a_slice(base_folder):
    full, cfg = load_hf_checkpoint(base_folder)
    part, _ = load_hf_checkpoint(base_folder, expert_range=(2, 5))
    assert part.expert_range == (2, 5) and full.expert_range == (0, cfg.n_routed_experts)
    for name in ("w_gate_up", "w_down"):
        a = getattr(full.model.layers[1].mlp.experts, name)
        b = getattr(part.model.layers[1].mlp.experts, name)
        assert b.shape[0] == 3
        torch.testing.assert_close(b, a[2:5], atol=0, rtol=0)
    torch.testing.assert_close(part.routers()[1].weight, full.routers()[1].weight)  # router stays global
    sd = load_file(base_folder / "model.safetensors")
    ours = hf_to_stacked(sd.__getitem__, sd.keys(), cfg, expert_range=(6, 8))
    assert ours["model.layers.1.mlp.experts.w_down"].shape[0] == 2
    with pytest.raises(AnnealError, match="gather all experts"):
        export_hf_checkpoint(part, base_folder.parent / "never")
    assert not (base_folder.parent / "never").exists()
    for bad in ((3, 3), (-1, 2), (0, 99), "ab"):
        with pytest.raises(AnnealError, match="expert_range"):
            load_hf_checkpoint(base_folder, expert_range=bad)


# ---------------------------------------------------------------------------------------------
# bad input: one clear error each
# ---------------------------------------------------------------------------------------------
def test_error_missing_folder_and_config(tmp_path):
    with pytest.raises(AnnealError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnnealError, match=r"config\.json.*missing"):
        load_hf_checkpoint(tmp_path / "empty")


def test_error_not_dots1(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(AnnealError, match="model_type is 'llama', not 'dots1'"):
        load_hf_checkpoint(tmp_path)


def test_error_no_safetensors(base_folder, tmp_path):
    d = tmp_path / "nosafe"
    d.mkdir()
    (d / "config.json").write_bytes((base_folder / "config.json").read_bytes())
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(AnnealError, match=r"no model\.safetensors.*pytorch_model\.bin"):
        load_hf_checkpoint(d)
    (d / "pytorch_model.bin").unlink()
    (d / "weights.safetensors").write_bytes((base_folder / "model.safetensors").read_bytes())
    with pytest.raises(AnnealError, match=r"weights\.safetensors.*no model\.safetensors\.index\.json"):
        load_hf_checkpoint(d)


def test_error_index_points_to_missing_shard(base_folder, tmp_path):
    model, _ = load_hf_checkpoint(base_folder)
    out = export_hf_checkpoint(model, tmp_path / "s", max_shard_size="8KB")
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(AnnealError, match=rf"index\.json: points to shard '{shard.name}'.*download"):
        load_hf_checkpoint(out)


def test_error_index_lies_about_a_tensor(base_folder, tmp_path):
    model, _ = load_hf_checkpoint(base_folder)
    out = export_hf_checkpoint(model, tmp_path / "s", max_shard_size="8KB")
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.norm.weight"] = shards[0] if index["weight_map"]["model.norm.weight"] != shards[0] \
        else shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(AnnealError, match="'model.norm.weight' is in .* but that file does not hold it"):
        load_hf_checkpoint(out)


def rewrite_weights(base_folder: Path, dst: Path, edit) -> Path:
    copy_folder(base_folder, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_error_missing_tensor(base_folder, tmp_path):
    d = rewrite_weights(base_folder, tmp_path / "m",
                        lambda sd: sd.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    with pytest.raises(AnnealError, match=r"tensor 'model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight' is missing"):
        load_hf_checkpoint(d)


def test_error_unexpected_tensor(base_folder, tmp_path):
    def add(sd):
        sd["model.layers.1.mlp.experts.8.up_proj.weight"] = torch.zeros(12, 32)  # expert 8 of 8
    d = rewrite_weights(base_folder, tmp_path / "u", add)
    with pytest.raises(AnnealError, match=r"unexpected tensor 'model\.layers\.1\.mlp\.experts\.8\.up_proj\.weight'"):
        load_hf_checkpoint(d)


def test_ignorable_tensor_only_warns(base_folder, tmp_path):
    def add(sd):
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    d = rewrite_weights(base_folder, tmp_path / "i", add)
    with pytest.warns(UserWarning, match="rotary_emb.inv_freq"):
        model, _ = load_hf_checkpoint(d)
    ref, _ = load_hf_checkpoint(base_folder)
    torch.testing.assert_close(our_logits(model), our_logits(ref), atol=0, rtol=0)


def test_error_shape_mismatch(base_folder, tmp_path):
    def edit(sd):
        sd["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(16, 32)
    d = rewrite_weights(base_folder, tmp_path / "x", edit)
    with pytest.raises(AnnealError, match=r"'model\.layers\.2\.self_attn\.k_proj\.weight' has shape \[16, 32\], "
                                          r"config\.json implies \[64, 32\]"):
        load_hf_checkpoint(d)


def test_error_config_disagrees_with_weights(base_folder, tmp_path):
    d = copy_folder(base_folder, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AnnealError, match=r"unexpected tensor 'model\.layers\.2\..*num_hidden_layers"):
        load_hf_checkpoint(d)


def test_in_memory_mapping_errors():
    hf = make_hf_model(**CONFIGS["mha_1dense_top2_shared1"])
    cfg = Dots1Config.from_hf_dict(hf.config.to_dict())
    sd = load_hf_state(hf)
    sd.pop("model.norm.weight")
    with pytest.raises(AnnealError, match=r"mem: tensor 'model\.norm\.weight' is missing"):
        hf_to_stacked(sd.__getitem__, sd.keys(), cfg, source="mem")
    sd["model.norm.weight"] = torch.ones(5)
    with pytest.raises(AnnealError, match=r"'model\.norm\.weight' has shape \[5\]"):
        hf_to_stacked(sd.__getitem__, sd.keys(), cfg)


def test_unsupported_sliding_window_is_refused(base_folder, tmp_path):
    d = copy_folder(base_folder, tmp_path / "sw")
    cfg = json.loads((d / "config.json").read_text())
    cfg["sliding_window"] = 4
    cfg["layer_types"] = ["sliding_attention"] * cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AnnealError, match="sliding-window attention is not supported"):
        load_hf_checkpoint(d)


# ---------------------------------------------------------------------------------------------
# export safety
# ---------------------------------------------------------------------------------------------
def test_export_refuses_non_empty_folder_unless_overwrite(base_folder, tmp_path):
    model, _ = load_hf_checkpoint(base_folder)
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(AnnealError, match="not empty.*--overwrite"):
        export_hf_checkpoint(model, target)
    with pytest.raises(AnnealError, match="not an earlier export"):   # overwrite replaces only an export
        export_hf_checkpoint(model, target, overwrite=True)
    assert (target / "keep.txt").exists()
    (target / "anneal_meta.json").write_text("{}")                     # now it is one
    export_hf_checkpoint(model, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no temp or backup folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf_checkpoint(model, empty)  # an empty folder is fine
    assert (empty / "model.safetensors").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(AnnealError, match="not a folder"):
        export_hf_checkpoint(model, tmp_path / "file")
    with pytest.raises(AnnealError, match="tokenizer folder does not exist"):
        export_hf_checkpoint(model, tmp_path / "t2", tokenizer_dir=tmp_path / "nope")
    assert not (tmp_path / "t2").exists()


class Boom(RuntimeError):
    pass


def fail_on_second_shard(monkeypatch):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise Boom("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    return calls


def test_export_is_atomic(base_folder, tmp_path, monkeypatch):
    model, _ = load_hf_checkpoint(base_folder)
    parent = tmp_path / "exports"
    calls = fail_on_second_shard(monkeypatch)
    with pytest.raises(Boom):
        export_hf_checkpoint(model, parent / "out", max_shard_size="8KB")
    assert len(calls) == 2
    assert not (parent / "out").exists()
    assert list(parent.iterdir()) == []  # the temp folder is gone too


def test_failed_overwrite_keeps_old_folder(base_folder, tmp_path, monkeypatch):
    model, _ = load_hf_checkpoint(base_folder)
    target = tmp_path / "t"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (target / "anneal_meta.json").write_text("{}")   # an earlier export
    fail_on_second_shard(monkeypatch)
    with pytest.raises(Boom):
        export_hf_checkpoint(model, target, max_shard_size="8KB", overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["anneal_meta.json", "old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_lazy_loader_reads_one_tensor_at_a_time(base_folder, monkeypatch):
    """The loader never asks safetensors for the whole file (load_file) and reads each tensor once."""
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("whole-file read"))
    reads = []
    real_open = hf_load.__dict__.get("safe_open")
    assert real_open is None  # imported lazily inside the functions
    import safetensors

    orig = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self._ctx = orig(*a, **k)

        def __enter__(self):
            self._f = self._ctx.__enter__()
            return self

        def __exit__(self, *exc):
            return self._ctx.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_slice(self, name):
            return self._f.get_slice(name)

        def get_tensor(self, name):
            reads.append(name)
            return self._f.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    model, cfg = load_hf_checkpoint(base_folder)
    assert sorted(reads) == sorted(hf_weight_plan(cfg))
