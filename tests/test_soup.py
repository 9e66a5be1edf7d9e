"""anneal-soup (anneal.checkpoints.soup): the soup of tiny exports is the weighted mean of its
ingredients tensor by tensor, loads in transformers and in our loader, records its ingredients;
every bad input is one clear error and leaves nothing behind."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anneal.checkpoints.hf_export import export_hf_checkpoint
from anneal.checkpoints.hf_load import load_hf_checkpoint
from anneal.checkpoints.soup import make_soup
from anneal.checkpoint_cli import soup_main
from anneal.errors import AnnealError
from anneal.model.config import Dots1Config
from anneal.model.dots1 import Dots1ForCausalLM
from anneal.paths import package_root

TOKENIZER = package_root() / "anneal" / "assets" / "tiny-stable"
ARCH = dict(vocab_size=4096, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, max_position_embeddings=64, eos_token_id=0)


@torch.no_grad()
def make_export(folder: Path, seed: int, dtype=None, started_from="tiny-stable", **arch) -> Path:
    """A tiny export as the trainer writes one (weights, tokenizer, anneal_meta.json); the router
    bias is non-zero so that averaging it is checked too."""
    model = Dots1ForCausalLM(Dots1Config(**{**ARCH, **arch}))
    model.init_weights(seed=seed)
    for router in model.routers().values():
        router.e_score_correction_bias.uniform_(-0.01, 0.01)
    meta = {"started_from": started_from, "stage": "stage2", "lr": 1e-5, "seed": seed}
    return export_hf_checkpoint(model, folder, tokenizer_dir=TOKENIZER, dtype=dtype, max_shard_size="200KB",
                                extra_files={"anneal_meta.json": json.dumps(meta)})


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("exports")
    return [make_export(root / f"seed{s}", seed=s) for s in (1, 2, 3)]


def test_soup_is_the_weighted_mean_and_loads_in_transformers(exports, tmp_path, capsys):
    import transformers

    out = tmp_path / "soup"
    soup_main([*map(str, exports), "--out", str(out), "--weights", "1", "2", "1", "--max-shard-size", "200KB"])
    printed = capsys.readouterr().out
    assert "peak host memory" in printed and f"wrote {out}" in printed

    inputs = [all_tensors(e) for e in exports]
    soup = all_tensors(out)
    assert set(soup) == set(inputs[0]) and len(list(out.glob("*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").is_file()
    for name, t in soup.items():  # the mean computed independently, in float64
        expected = sum(w * x[name].double() for w, x in zip((0.25, 0.5, 0.25), inputs))
        assert t.dtype == inputs[0][name].dtype, name
        torch.testing.assert_close(t.double(), expected, atol=1e-6, rtol=1e-6, msg=name)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert not torch.equal(soup[bias], inputs[0][bias])   # the router bias is averaged, not copied

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_params = hf.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.2.mlp.gate.weight", "lm_head.weight", bias):
        torch.testing.assert_close(hf_params[name], soup[name].float(), atol=0, rtol=0)
    ours, _ = load_hf_checkpoint(out)
    ids = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

    meta = json.loads((out / "anneal_meta.json").read_text())
    assert meta["started_from"] == "tiny-stable" and meta["lr"] == 1e-5 and "seed" not in meta
    assert [i["weight"] for i in meta["soup"]["ingredients"]] == [0.25, 0.5, 0.25]
    assert [i["anneal_meta"]["seed"] for i in meta["soup"]["ingredients"]] == [1, 2, 3]
    assert [Path(i["path"]) for i in meta["soup"]["ingredients"]] == [e.resolve() for e in exports]
    assert (out / "tokenizer.json").read_bytes() == (exports[0] / "tokenizer.json").read_bytes()


def _copy_with(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _rebase(folder: Path) -> None:
    meta = json.loads((folder / "anneal_meta.json").read_text())
    (folder / "anneal_meta.json").write_text(json.dumps({**meta, "started_from": "dots1.base-10T"}))


def _drop_shard(folder: Path) -> None:
    (folder / "model-00002-of-00003.safetensors").unlink()


BAD = {  # name -> (ingredients from (exports, tmp_path), kwargs, the message's key part)
    "one ingredient": (lambda e, t: e[:1], {}, "needs two or more exports, got 1"),
    "wrong weight count": (lambda e, t: e[:2], {"weights": [1, 2, 3]}, "3 weight(s) for 2 ingredients"),
    "weights sum to zero": (lambda e, t: e[:2], {"weights": [1, -1]}, "sum to 0; they must sum to a positive"),
    "different base": (lambda e, t: [e[0], _copy_with(e[1], t / "b", _rebase)], {},
                       "started_from is 'dots1.base-10T' but"),
    "missing shard": (lambda e, t: [e[0], _copy_with(e[1], t / "b", _drop_shard)], {},
                      "points to shard 'model-00002-of-00003.safetensors', which is not in"),
    "different architecture": (lambda e, t: [e[0], make_export(t / "b", 1, num_hidden_layers=2)], {},
                               "field 'num_hidden_layers' is 2 but"),
    "different dtype": (lambda e, t: [e[0], make_export(t / "b", 1, dtype=torch.bfloat16)], {},
                        "is BF16 [4096, 32] but in"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_error_and_writes_nothing(exports, tmp_path, case):
    make_ingredients, kwargs, message = BAD[case]
    out = tmp_path / "soup"
    with pytest.raises(AnnealError, match=re.escape(message)):
        make_soup(make_ingredients(exports, tmp_path), out, max_shard_size="200KB", **kwargs)
    assert not out.exists() and not list(tmp_path.glob(".soup*"))


def test_different_bases_on_request_and_existing_output(exports, tmp_path, capsys):
    other = _copy_with(exports[1], tmp_path / "b", _rebase)
    out = make_soup([exports[0], other], tmp_path / "soup", allow_different_bases=True).folder
    meta = json.loads((out / "anneal_meta.json").read_text())
    assert "started_from" not in meta                 # the ingredients disagree: the soup claims no base
    assert [i["anneal_meta"]["started_from"] for i in meta["soup"]["ingredients"]] == ["tiny-stable", "dots1.base-10T"]
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SystemExit) as exit_:          # the CLI: one line, no traceback, the folder untouched
        soup_main([str(exports[0]), str(exports[1]), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "already exists" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == before
