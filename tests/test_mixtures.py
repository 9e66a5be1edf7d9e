"""Tests of the mixtures package: spec validation, sampling proportions, packing, exact resume,
exhaustion, held-out split, tokenizer determinism, background tokenization."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mixtures import (MixtureError, MixtureExhausted, MixtureWarning, PackedMixtureStream,
                      build_tokenizer_from_corpus, load_mixture)
from mixtures.sources import load_sources

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def demo():
    return load_mixture("demo")


@pytest.fixture(scope="session")
def tok(demo):
    return build_tokenizer_from_corpus(demo, vocab_size=4096)


def _words(rng, n):
    vocab = ["alpha", "beta", "gamma", "delta", "lobster", "river", "seven", "plus", "code",
             "def", "return", "(", ")", ":", "=", "the", "of", "and", "42", "x"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def make_mixture(tmp_path: Path, sources: list[dict], name="t") -> Path:
    """Write jsonl files for sources given as {name, n_docs, min_len, max_len, ...spec keys}."""
    spec_sources = []
    for k, s in enumerate(sources):
        s = dict(s)
        rng = random.Random(k)
        n, lo, hi = s.pop("n_docs"), s.pop("min_len", 5), s.pop("max_len", 60)
        f = tmp_path / f"{s['name']}.jsonl"
        with open(f, "w") as fh:
            for i in range(n):
                fh.write(json.dumps({"text": f"{s['name']} doc {i}: " + _words(rng, rng.randint(lo, hi))}) + "\n")
        s.setdefault("data", {"path": f.name})
        s.setdefault("text", "text")
        spec_sources.append(s)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "sources": spec_sources}, sort_keys=False))
    return p


def write_yaml(tmp_path: Path, obj, name="m.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(obj, sort_keys=False))
    return p


def batches(stream, sizes):
    return [stream.next_batch(n) for n in sizes]


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


# ----------------------------------------------------------------------------- spec
def test_demo_spec(demo):
    assert demo.source_names == ["wiki", "gsm8k", "humaneval"]
    assert demo.stage_names == ["warmup", "stable", "stage1", "stage2"]
    w1, w2 = demo.normalized_weights("stage1"), demo.normalized_weights("stage2")
    assert w1[0] > 0.5 and w2[1] + w2[2] > 0.5      # knowledge-heavy, then math/code-heavy
    demo.check_stages(["warmup", "stable", "stage1", "stage2"])
    demo.check_stages(["warmup", "stable", "stage1", "stage2", "cooldown"], active_stages=["stage1"])
    srcs = load_sources(demo)
    assert [s.n_docs for s in srcs] == [60, 2000, 164]


def test_check_stages_errors(demo, tmp_path):
    with pytest.raises(MixtureError, match=r"stage\(s\) \['warmup', 'stable'\].*schedule's stages"):
        demo.check_stages(["stage1", "stage2"])
    with pytest.raises(MixtureError, match=r"runs stage\(s\) \['stage3'\]"):
        demo.check_stages(["warmup", "stable", "stage1", "stage2", "stage3"])
    # a `default` weight covers stages the mixture does not name
    p = make_mixture(tmp_path, [dict(name="a", n_docs=5, weights={"stage1": 1, "default": 1}),
                                dict(name="b", n_docs=5, weights={"default": 2})])
    spec = load_mixture(p)
    spec.check_stages(["warmup", "stage1", "stage2"])
    assert spec.normalized_weights("warmup") == pytest.approx([1 / 3, 2 / 3])
    assert spec.normalized_weights("stage1") == pytest.approx([1 / 3, 2 / 3])
    with pytest.raises(MixtureError, match=r"stage 'nope' has no weights"):
        load_mixture(make_mixture(tmp_path, [dict(name="a", n_docs=5, weights={"s": 1})])).weights("nope")


@pytest.mark.parametrize("mutate, pattern", [
    (lambda s: s["sources"][0]["weights"].update(s1=-1), r"source 'a'.*weights.s1 is negative"),
    (lambda s: [x["weights"].update(s2=0) for x in s["sources"]], r"all weights are zero in stage 's2'"),
    (lambda s: s["sources"][0].update(wieghts=1), r"source 'a'.*unknown key\(s\) \['wieghts'\]"),
    (lambda s: s["sources"][0].update(on_exhausted="loop"), r"on_exhausted must be"),
    (lambda s: s["sources"][1].update(name="a"), r"two sources are named 'a'"),
    (lambda s: s["sources"][0].update(data={"path": "missing.jsonl"}),
     r"source 'a'.*missing.jsonl not found.*relative to the mixture file"),
    (lambda s: s["sources"][0].update(data={"path": "shards/*.jsonl"}),
     r"source 'a'.*glob 'shards/\*.jsonl'.*matches no file"),
    (lambda s: s["sources"][0].update(text="{question"), r"source 'a'.*template"),
    (lambda s: s["sources"][0].update(weights={"s1": "lots"}), r"weights.s1 must be a number"),
])
def test_spec_errors(tmp_path, mutate, pattern):
    p = make_mixture(tmp_path, [dict(name="a", n_docs=5, weights={"s1": 1, "s2": 1}),
                                dict(name="b", n_docs=5, weights={"s1": 1, "s2": 1})])
    obj = yaml.safe_load(p.read_text())
    mutate(obj)
    p.write_text(yaml.safe_dump(obj))
    with pytest.raises(MixtureError, match=pattern) as ei:
        load_mixture(p)
    assert str(p) in str(ei.value)          # names the mixture file


def test_bad_yaml_and_unknown_name(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: x\nsources:\n  - name: a\n    weights: {s1: 1\n")
    with pytest.raises(MixtureError, match=r"broken.yaml: line \d+ column \d+ is not valid YAML"):
        load_mixture(p)
    with pytest.raises(MixtureError, match=r"unknown mixture 'nosuch'.*\['demo'"):
        load_mixture("nosuch")


# ----------------------------------------------------------------------------- data errors
def test_missing_field_error_names_file_and_line(tmp_path, tok):
    f = tmp_path / "qa.jsonl"
    f.write_text('{"question": "q1", "answer": "a1"}\n\n{"question": "q2"}\n')
    p = write_yaml(tmp_path, {"sources": [{"name": "qa", "data": {"path": "qa.jsonl"},
                                           "text": "{question} {answer}", "weights": {"s": 1}}]})
    with pytest.raises(MixtureError, match=r"source 'qa'.*qa.jsonl line 3 has no field 'answer'.*on_bad_record: skip"):
        PackedMixtureStream(load_mixture(p), tok, seq_len=8)
    p = write_yaml(tmp_path, {"sources": [{"name": "qa", "data": {"path": "qa.jsonl"},
                                           "text": "{title}", "weights": {"s": 1}}]})
    with pytest.raises(MixtureError, match=r"qa.jsonl has no field 'title' \(its fields: \['question', 'answer'\]\)"):
        PackedMixtureStream(load_mixture(p), tok, seq_len=8)


def test_missing_field_and_empty_text_skip(tmp_path):
    f = tmp_path / "qa.jsonl"
    rows = [{"q": "q1", "a": "a1"}, {"q": "q2"}, {"q": "  ", "a": "\n"}, {"q": "q4", "a": 4},
            {"q": "", "a": ""}, {"q": "q6", "a": "a6"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = write_yaml(tmp_path, {"sources": [{"name": "qa", "data": {"path": "qa.jsonl"}, "text": "{q}\n{a}",
                                           "weights": {"s": 1}, "on_bad_record": "skip"}]})
    with pytest.warns(MixtureWarning, match=r"skipped 3 bad record\(s\).*3 documents kept"):
        src = load_sources(load_mixture(p))[0]
    assert src.texts(range(3)) == ["q1\na1", "q4\n4", "q6\na6"]
    # a template with literal text is never empty: only the missing field is skipped
    p = write_yaml(tmp_path, {"sources": [{"name": "qa", "data": {"path": "qa.jsonl"},
                                           "text": "Q: {q} A: {a}", "weights": {"s": 1},
                                           "on_bad_record": "skip"}]})
    with pytest.warns(MixtureWarning, match=r"skipped 1 bad record"):
        assert load_sources(load_mixture(p))[0].n_docs == 5


def test_corrupt_jsonl_fail_and_skip(tmp_path, tok):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n[1, 2]\n{"text": "four"}\n')
    src = {"name": "c", "data": {"path": "c.jsonl"}, "text": "text", "weights": {"s": 1}}
    p = write_yaml(tmp_path, {"sources": [src]})
    with pytest.raises(MixtureError, match=r"source 'c'.*c.jsonl line 2: invalid JSON.*on_bad_record: skip"):
        load_sources(load_mixture(p))
    p = write_yaml(tmp_path, {"sources": [dict(src, on_bad_record="skip")]})
    with pytest.warns(MixtureWarning, match=r"source 'c'.*skipped 2 bad record\(s\).*3 documents kept"):
        srcs = load_sources(load_mixture(p))
    assert srcs[0].texts(range(3)) == ["one", "three", "four"]


def test_empty_source_error(tmp_path, tok):
    (tmp_path / "e.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    for fname in ("e.jsonl", "blank.txt"):
        p = write_yaml(tmp_path, {"sources": [{"name": "e", "data": {"path": fname}, "weights": {"s": 1}}]})
        with pytest.raises(MixtureError, match=rf"source 'e'.*no documents in .*{fname}"):
            load_sources(load_mixture(p))


def test_heldout_too_many(tmp_path):
    p = make_mixture(tmp_path, [dict(name="a", n_docs=5, weights={"s": 1}, heldout_docs=5)])
    with pytest.raises(MixtureError, match=r"heldout_docs is 5 but the source has only 5"):
        load_sources(load_mixture(p))


def test_formats_text_split_and_csv_parquet(tmp_path, tok):
    (tmp_path / "a.txt").write_text(" = A = \n line a1 \n = = sub = = \n a2\n = B = \nb1\n")
    import datasets
    datasets.Dataset.from_dict({"t": ["p1", "p2"]}).to_parquet(str(tmp_path / "p.parquet"))
    (tmp_path / "c.csv").write_text("label,review\n1,good hotel\n0,bad room\n")
    d = tmp_path / "shards"
    d.mkdir()
    for i in range(3):
        (d / f"s{i}.jsonl").write_text(json.dumps({"text": f"shard {i}"}) + "\n")
    p = write_yaml(tmp_path, {"sources": [
        {"name": "wiki", "data": {"path": "a.txt", "split_on": "^ = [^=].* = $"}, "weights": {"s": 1}},
        {"name": "pq", "data": {"path": "p.parquet"}, "text": "t", "weights": {"s": 1}},
        {"name": "csv", "data": {"path": "c.csv"}, "text": "[{label}] {review}", "weights": {"s": 1}},
        {"name": "dir", "data": {"path": "shards"}, "weights": {"s": 1}},
        {"name": "glob", "data": {"path": ["shards/s[01].jsonl"]}, "weights": {"s": 1}},
    ]})
    srcs = load_sources(load_mixture(p))
    assert srcs[0].texts([0, 1]) == ["= A = \n line a1 \n = = sub = = \n a2", "= B = \nb1"]
    assert srcs[1].texts([1, 0]) == ["p2", "p1"]
    assert srcs[2].texts([0, 1]) == ["[1] good hotel", "[0] bad room"]
    assert srcs[3].texts(range(3)) == ["shard 0", "shard 1", "shard 2"]
    assert srcs[4].n_docs == 2


@pytest.mark.skipif(not (CORPUS / "chnsenticorp_htl.csv").exists(), reason="shared corpus not present")
def test_chinese_csv_from_shared_corpus(tmp_path, tok):
    p = write_yaml(tmp_path, {"sources": [
        {"name": "zh", "data": {"path": str(CORPUS / "chnsenticorp_htl.csv")}, "text": "review",
         "weights": {"s": 1}, "on_bad_record": "skip", "heldout_docs": 10}]})
    spec = load_mixture(p)
    st = PackedMixtureStream(spec, tok, seq_len=64, seed=0)
    b = st.next_batch(4)
    assert b["input_ids"].shape == (4, 65)
    text = tok.decode(b["input_ids"][0])
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)   # byte-level BPE round-trips Chinese


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_deterministic(demo, tok, tmp_path):
    tok2 = build_tokenizer_from_corpus(load_mixture("demo"), vocab_size=4096)
    assert tok.backend_tokenizer.to_str() == tok2.backend_tokenizer.to_str()
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id is not None and len(tok) == 4096
    tok.save_pretrained(tmp_path / "tk")
    from transformers import AutoTokenizer
    tok3 = AutoTokenizer.from_pretrained(tmp_path / "tk")
    s = "Question: 3 + 4 = ?\ndef f(x):\n    return x  # 中文"
    assert tok3(s, add_special_tokens=False)["input_ids"] == tok(s, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s


def test_tokenizer_deterministic_across_processes(tok):
    """Rust hash maps are seeded per process: build the tokenizer in a fresh interpreter too."""
    import hashlib
    import os
    import subprocess
    import sys
    code = ("import hashlib; from mixtures import load_mixture, build_tokenizer_from_corpus; "
            "t = build_tokenizer_from_corpus(load_mixture('demo'), vocab_size=4096); "
            "print(hashlib.sha256(t.backend_tokenizer.to_str().encode()).hexdigest())")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep
               + os.environ.get("PYTHONPATH", ""), RAYON_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()


# ----------------------------------------------------------------------------- packing
def test_batch_format_and_packing(demo, tok):
    st = PackedMixtureStream(demo, tok, seq_len=64, seed=1, stage="stage2")
    bs = batches(st, [3, 1, 5])
    L = 64
    for b in bs:
        for k in ("input_ids", "position_ids", "source_ids"):
            assert b[k].dtype == torch.long and b[k].shape[1] == L + 1
    rows = torch.cat([b["input_ids"] for b in bs])
    # consecutive rows share one token: row k's last token is row k+1's first
    assert torch.equal(rows[:-1, -1], rows[1:, 0])
    # the stream of unique tokens
    flat = torch.cat([rows[0]] + [r[1:] for r in rows[1:]])
    src = torch.cat([b["source_ids"] for b in bs])
    flat_src = torch.cat([src[0]] + [r[1:] for r in src[1:]])
    pos = torch.cat([b["position_ids"] for b in bs])
    eos = tok.eos_token_id
    for r in range(rows.shape[0]):
        ids, p = rows[r], pos[r]
        assert p[0] == 0
        for j in range(1, L + 1):
            # positions restart exactly after an EOS, else count up
            assert p[j] == (0 if ids[j - 1] == eos else p[j - 1] + 1)
        # a source change only happens at a document start
        s = src[r]
        assert all(p[j] == 0 for j in range(1, L + 1) if s[j] != s[j - 1])
    acc = st.accounting()
    assert sum(a["tokens"] for a in acc.values()) == len(flat) == 9 * L + 1
    for i, name in enumerate(demo.source_names):
        assert acc[name]["tokens"] == int((flat_src == i).sum())
    # documents = number of document starts seen (first token + tokens after EOS)
    starts = torch.cat([torch.tensor([True]), flat[:-1] == eos])
    for i, name in enumerate(demo.source_names):
        assert acc[name]["documents"] == int((starts & (flat_src == i)).sum())
    # the stream starts with (a prefix of) a real document of the source it is labelled with
    ends = (flat == eos).nonzero()
    first = flat[: int(ends[0])] if len(ends) else flat
    src0 = load_sources(demo)[int(flat_src[0])]
    assert any(t.startswith(tok.decode(first)) for t in src0.texts(range(src0.n_docs)))


def test_proportions_at_prefixes(tmp_path, tok):
    p = make_mixture(tmp_path, [
        dict(name="a", n_docs=300, min_len=5, max_len=120, weights={"s1": 0.6, "s2": 0.1}),
        dict(name="b", n_docs=300, min_len=40, max_len=200, weights={"s1": 0.3, "s2": 0.3}),
        dict(name="c", n_docs=300, min_len=1, max_len=30, weights={"s1": 0.1, "s2": 0.6}),
    ])
    spec = load_mixture(p)
    st = PackedMixtureStream(spec, tok, seq_len=32, seed=7, stage="s1")
    srcs = load_sources(spec)
    max_len = max(len(ids) for s in srcs for ids in st.encode(s.texts(range(s.n_docs))))
    for stage, n_batches in (("s1", 120), ("s2", 120)):
        st.set_stage(stage)
        w = spec.normalized_weights(stage)
        base = st.accounting()
        for k in range(1, n_batches + 1):
            st.next_batch(3)
            acc = st.accounting()
            got = [acc[n]["tokens"] - base[n]["tokens"] for n in spec.source_names]
            T = sum(got)
            # sampler level: exact fairness within one document
            pulled = st.sampler.tokens
            TP = sum(pulled)
            for i in range(3):
                assert abs(pulled[i] - w[i] * TP) <= max_len, (stage, k, i, pulled)
            # emitted tokens: within one document plus the packing buffer's partial document
            if k in (1, 2, 5, 10, 30, 60, n_batches):
                for i in range(3):
                    assert abs(got[i] - w[i] * T) <= 2 * max_len, (stage, k, i, got, w)
        assert T == n_batches * 3 * 32 + (stage == "s1")    # + the very first token
        shares = [g / T for g in got]
        assert shares == pytest.approx(w, abs=0.02)


def test_demo_proportions(demo, tok):
    st = PackedMixtureStream(demo, tok, seq_len=256, seed=3, stage="stage1")
    for stage in ("stage1", "stage2"):
        st.set_stage(stage)
        base = st.accounting()
        for _ in range(60):
            st.next_batch(8)
        acc = st.accounting()
        got = np.array([acc[n]["tokens"] - base[n]["tokens"] for n in demo.source_names])
        w = np.array(demo.normalized_weights(stage))
        # wiki articles are long (~5k tokens): bound by one article
        assert np.all(np.abs(got - w * got.sum()) <= 12000), (stage, got, w * got.sum())


def test_different_seed_different_order_same_heldout(demo, tok):
    a = PackedMixtureStream(demo, tok, seq_len=64, seed=1, stage="stage2")
    b = PackedMixtureStream(demo, tok, seq_len=64, seed=2, stage="stage2")
    assert not torch.equal(a.next_batch(4)["input_ids"], b.next_batch(4)["input_ids"])
    for name in demo.source_names:
        ha, hb = a.heldout_batches(name, 2, 64), b.heldout_batches(name, 2, 64)
        assert all(torch.equal(ha[k], hb[k]) for k in ha)


# ----------------------------------------------------------------------------- resume
def _schedule():
    """A run: (stage, batch size) per call, with a stage switch in the middle."""
    return [("stage1", n) for n in (1, 3, 2, 1, 4, 2, 1)] + [("stage2", n) for n in (2, 1, 3, 1, 2, 5, 1)]


def _run(stream, plan, save_at=None):
    out, saved = [], None
    for k, (stage, n) in enumerate(plan):
        if save_at == k:
            saved = json.loads(json.dumps(stream.state_dict()))   # JSON round trip
        stream.set_stage(stage)
        out.append(stream.next_batch(n))
    return out, saved


@pytest.mark.parametrize("seq_len", [16, 100])
def test_exact_resume_everywhere(demo, tok, seq_len):
    plan = _schedule()
    ref, _ = _run(PackedMixtureStream(demo, tok, seq_len=seq_len, seed=5, stage="stage1", block_docs=4), plan)
    mid_doc = 0
    for cut in range(1, len(plan)):
        a = PackedMixtureStream(demo, tok, seq_len=seq_len, seed=5, stage="stage1", block_docs=4)
        _, sd = _run(a, plan[: cut + 1], save_at=cut)
        mid_doc += any(off > 0 for *_, off in sd["buffer"])
        b = PackedMixtureStream(demo, tok, seq_len=seq_len, seed=5, stage="stage2", block_docs=3)  # stage: overwritten
        b.load_state_dict(sd)
        rest, _ = _run(b, plan[cut:])
        assert same(rest, ref[cut:]), f"resume at call {cut} differs"
        assert b.accounting() == _run_acc(demo, tok, seq_len, plan)
    assert mid_doc >= 3      # several cuts were in the middle of a document


_ACC_CACHE = {}


def _run_acc(demo, tok, seq_len, plan):
    key = (seq_len, len(plan))
    if key not in _ACC_CACHE:
        s = PackedMixtureStream(demo, tok, seq_len=seq_len, seed=5, stage="stage1", block_docs=4)
        _run(s, plan)
        _ACC_CACHE[key] = s.accounting()
    return _ACC_CACHE[key]


def test_resume_with_torch_save_and_mismatch_errors(demo, tok, tmp_path):
    a = PackedMixtureStream(demo, tok, seq_len=32, seed=9, stage="stage2")
    a.next_batch(7)
    torch.save({"data": a.state_dict()}, tmp_path / "ck.pt")
    ref = a.next_batch(5)
    b = PackedMixtureStream(demo, tok, seq_len=32, seed=9, stage="stage2")
    b.load_state_dict(torch.load(tmp_path / "ck.pt", weights_only=True)["data"])
    got = b.next_batch(5)  # one batch, every field (a next_batch per field compared later batches)
    assert set(got) == set(ref) and all(torch.equal(ref[k], got[k]) for k in ref)
    c = PackedMixtureStream(demo, tok, seq_len=64, seed=9, stage="stage2")
    with pytest.raises(MixtureError, match=r"saved seq_len 32 differs"):
        c.load_state_dict(a.state_dict())


# ----------------------------------------------------------------------------- exhaustion
def _stream_texts(stream, tok, n_batches, n=4):
    rows = [stream.next_batch(n) for _ in range(n_batches)]
    ids = torch.cat([r["input_ids"] for r in rows])
    flat = torch.cat([ids[0]] + [r[1:] for r in ids[1:]]).tolist()
    eos = tok.eos_token_id
    docs, cur = [], []
    for t in flat:
        if t == eos:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    return docs


def test_exhaustion_repeat(tmp_path, tok):
    p = make_mixture(tmp_path, [dict(name="big", n_docs=400, weights={"s": 1}),
                                dict(name="small", n_docs=10, weights={"s": 1}, heldout_docs=2)])
    spec = load_mixture(p)
    st = PackedMixtureStream(spec, tok, seq_len=64, seed=0, stage="s")
    docs = _stream_texts(st, tok, 40)
    small = [d for d in docs if d.startswith("small")]
    assert len(small) >= 24
    train = set(load_sources(spec)[1].texts(load_sources(spec)[1].train_idx))
    epochs = [small[i:i + 8] for i in range(0, 24, 8)]
    for e in epochs:
        assert set(e) == train                       # each epoch: every training doc exactly once
    assert epochs[0] != epochs[1] != epochs[2]       # reshuffled each epoch
    assert st.accounting()["small"]["epochs"] > 3


def test_exhaustion_stop(tmp_path, tok):
    p = make_mixture(tmp_path, [dict(name="a", n_docs=200, weights={"s": 0.5}),
                                dict(name="b", n_docs=200, weights={"s": 0.3}),
                                dict(name="few", n_docs=6, weights={"s": 0.2}, on_exhausted="stop")])
    spec = load_mixture(p)
    st = PackedMixtureStream(spec, tok, seq_len=64, seed=0, stage="s")
    with pytest.warns(MixtureWarning, match=r"source 'few' is exhausted after 6 documents"):
        for _ in range(30):
            st.next_batch(4)
    acc = st.accounting()
    assert acc["few"]["documents"] == 6 and acc["few"]["epochs"] == 1.0
    # after the drop, a and b keep their 5:3 ratio
    before = {n: acc[n]["tokens"] for n in acc}
    for _ in range(40):
        st.next_batch(4)
    acc = st.accounting()
    da, db = acc["a"]["tokens"] - before["a"], acc["b"]["tokens"] - before["b"]
    assert acc["few"]["documents"] == 6
    assert da / (da + db) == pytest.approx(0.5 / 0.8, abs=0.05)

    p = make_mixture(tmp_path, [dict(name="x", n_docs=5, weights={"s": 1}, on_exhausted="stop"),
                                dict(name="y", n_docs=5, weights={"s": 0, "t": 1})], name="u")
    st = PackedMixtureStream(load_mixture(p), tok, seq_len=64, seed=0, stage="s")
    with pytest.warns(MixtureWarning), pytest.raises(MixtureExhausted, match=r"every source with a weight in stage 's' is exhausted"):
        for _ in range(50):
            st.next_batch(4)


# ----------------------------------------------------------------------------- held-out
def test_heldout_disjoint_and_fixed(demo, tok):
    st = PackedMixtureStream(demo, tok, seq_len=128, seed=11, stage="stage2")
    srcs = load_sources(demo)
    for s in srcs:
        assert len(s.heldout_idx) == s.spec.heldout_docs
        assert not set(s.heldout_idx.tolist()) & set(s.train_idx.tolist())
        assert len(s.heldout_idx) + len(s.train_idx) == s.n_docs
    docs = set(_stream_texts(st, tok, 30, n=8))
    held = {t for s in srcs for t in s.texts(s.heldout_idx)}
    assert docs and not docs & held
    hb = st.heldout_batches("gsm8k", 4, 128)
    assert hb["input_ids"].shape == (4, 129) and bool((hb["source_ids"] == 1).all())
    flat = torch.cat([hb["input_ids"][0]] + [r[1:] for r in hb["input_ids"][1:]])
    first_doc = tok.decode(flat[: int((flat == tok.eos_token_id).nonzero()[0])])
    assert first_doc == srcs[1].texts(srcs[1].heldout_idx[:1])[0]
    assert torch.equal(hb["input_ids"], st.heldout_batches("gsm8k", 4, 128)["input_ids"])
    with pytest.warns(MixtureWarning, match="raise its heldout_docs"):
        assert st.heldout_batches("humaneval", 1000, 128)["input_ids"].shape[0] < 1000


# ----------------------------------------------------------------------------- background
def test_background_workers_identical(demo, tok):
    plan = _schedule()
    ref, sd_ref = _run(PackedMixtureStream(demo, tok, seq_len=64, seed=5, stage="stage1"), plan, save_at=9)
    with PackedMixtureStream(demo, tok, seq_len=64, seed=5, stage="stage1", num_workers=2,
                             block_docs=8, prefetch_blocks=3) as bg:
        got, sd = _run(bg, plan, save_at=9)
    assert same(got, ref)
    assert sd == sd_ref
    with PackedMixtureStream(demo, tok, seq_len=64, seed=5, stage="stage1", num_workers=1,
                             block_docs=8) as bg2:
        bg2.load_state_dict(sd)
        rest, _ = _run(bg2, plan[9:])
    assert same(rest, ref[9:])


# ----------------------------------------------------------------------------- plan
def test_plan_matches_stream(demo, tok):
    from mixtures import format_plan, plan_mixture
    from mixtures.plan import parse_tokens
    assert parse_tokens("20B") == 20 * 10**9 and parse_tokens("1.5M") == 1_500_000
    assert parse_tokens("300k") == 300_000 and parse_tokens("1e6") == 10**6
    rows = plan_mixture(demo, tok, {"stage1": "40k", "stage2": "60k"}, seq_len=100, repeat_warn=0.5)
    assert [(r["stage"], r["source"]) for r in rows][:3] == [("stage1", n) for n in demo.source_names]
    st = PackedMixtureStream(demo, tok, seq_len=100, seed=0, stage="stage1")
    acc = {}
    for stage, n in (("stage1", 400), ("stage2", 600)):
        st.set_stage(stage)
        for _ in range(n // 8):
            st.next_batch(8)
        st.next_batch(n % 8)
        acc[stage] = st.accounting()
    srcs = load_sources(demo)
    enc_tokens = [sum(len(d) for d in st.encode(s.texts(s.train_idx))) for s in srcs]
    for r in rows:
        i = demo.source_index(r["source"])
        assert r["docs"] == len(srcs[i].train_idx) and r["source_tokens"] == enc_tokens[i]
        got = acc[r["stage"]][r["source"]]["tokens"]
        if r["stage"] == "stage2":
            got -= acc["stage1"][r["source"]]["tokens"]
        assert abs(got - r["tokens"]) <= 12000      # within one wiki article
    assert any(r["warning"] and "passes" in r["warning"] for r in rows)
    text = format_plan(rows)
    assert "humaneval" in text and "WARNING" in text


def test_plan_cli_and_stop_warning(tmp_path, tok, capsys):
    from anneal.cli import plan_main
    from mixtures import plan_mixture
    p = make_mixture(tmp_path, [dict(name="a", n_docs=50, weights={"s1": 1}),
                                dict(name="few", n_docs=4, weights={"s1": 1}, on_exhausted="stop")])
    tok.save_pretrained(tmp_path / "tk")
    rows = plan_mixture(load_mixture(p), tok, {"s1": 1000})
    few = [r for r in rows if r["source"] == "few"][0]
    assert "runs out after" in few["warning"] and few["tokens"] == few["source_tokens"]
    plan_main(["mixture", str(p), "--seq-len", "64", "--stage-tokens", "s1=1k", "--tokenizer", str(tmp_path / "tk"),
               "--json", str(tmp_path / "plan.json")])   # returns: exit status 0
    out = capsys.readouterr().out
    assert "few" in out and "runs out" in out
    assert len(json.loads((tmp_path / "plan.json").read_text())) == 2
    with pytest.raises(SystemExit) as exit_:
        plan_main(["mixture", str(p), "--stage-tokens", "s9=1k", "--tokenizer", str(tmp_path / "tk")])
    assert exit_.value.code == 2
    assert "stage 's9' has no weights" in capsys.readouterr().err


# ----------------------------------------------------------------------------- streaming
def test_streaming_source_resume_repeat_heldout(tmp_path, tok):
    from mixtures import plan_mixture
    p = make_mixture(tmp_path, [
        dict(name="mem", n_docs=100, weights={"s1": 1, "s2": 1}),
        dict(name="st", n_docs=30, weights={"s1": 1, "s2": 3}, heldout_docs=3,
             data={"path": "st.jsonl", "streaming": True, "shuffle_buffer": 8}),
    ])
    spec = load_mixture(p)
    srcs = load_sources(spec)
    assert srcs[1].streaming and srcs[1].n_train is None
    held = srcs[1].heldout_texts()
    assert [h.split(":")[0] for h in held] == ["st doc 0", "st doc 1", "st doc 2"]
    plan = [("s1", n) for n in (2, 1, 3, 2)] + [("s2", n) for n in (1, 4, 2, 3, 2, 2)]
    ref, _ = _run(PackedMixtureStream(spec, tok, seq_len=32, seed=3, stage="s1", block_docs=4), plan)
    for cut in (1, 3, 4, 6, 8):
        a = PackedMixtureStream(spec, tok, seq_len=32, seed=3, stage="s1", block_docs=4)
        _, sd = _run(a, plan[: cut + 1], save_at=cut)
        b = PackedMixtureStream(spec, tok, seq_len=32, seed=3, stage="s1", block_docs=5)
        b.load_state_dict(sd)
        rest, _ = _run(b, plan[cut:])
        assert same(rest, ref[cut:]), cut
    st = PackedMixtureStream(spec, tok, seq_len=32, seed=3, stage="s2")
    docs = _stream_texts(st, tok, 30)
    st_docs = [d for d in docs if d.startswith("st doc")]
    assert not set(st_docs) & set(held)
    assert len(set(st_docs[:27])) == 27 and st_docs[:27] != st_docs[27:54]   # epoch, reshuffled
    assert srcs[1].n_train == 27 and st.accounting()["st"]["epochs"] > 1
    rows = plan_mixture(spec, tok, {"s1": 1000})
    assert rows[1]["docs"] == 27 and rows[1]["source_tokens"] > 0


def test_streaming_background_identical(tmp_path, tok):
    p = make_mixture(tmp_path, [dict(name="mem", n_docs=60, weights={"s": 1}),
                                dict(name="st", n_docs=40, weights={"s": 1},
                                     data={"path": "st.jsonl", "streaming": True})])
    spec = load_mixture(p)
    ref = batches(PackedMixtureStream(spec, tok, seq_len=32, seed=1), [4] * 20)
    with PackedMixtureStream(spec, tok, seq_len=32, seed=1, num_workers=1, block_docs=8) as bg:
        assert same(batches(bg, [4] * 20), ref)


def test_bundled_template_offline():
    import datasets
    from mixtures import bundled_mixtures
    assert {"demo", "dots1_template"} <= set(bundled_mixtures())
    spec = load_mixture("dots1_template")
    spec.check_stages(["stage1", "stage2"])
    w = spec.normalized_weights("stage2")
    assert w[spec.source_index("math_web")] + w[spec.source_index("code")] > 0.5
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("would go to the hub")
    with pytest.raises(MixtureError, match=r"source 'web_edu'.*HuggingFaceFW/fineweb-edu.*internet or the HF cache"):
        load_sources(spec)


def test_plan_tables_keep_columns_apart_at_any_size():
    """1T-token stages over a small source: 7-digit epoch counts. The plain table sizes its columns
    to their cells and the rich table fits 80 columns; no two numbers run together."""
    from io import StringIO

    from rich.console import Console

    from anneal.planning import plan_table
    from mixtures import format_plan

    rows = [{"stage": "stage1", "source": "wiki", "docs": 56, "source_tokens": 294_280, "estimated": False,
             "share": 0.5, "tokens": 500 * 10**9, "sequences": None, "epochs": 1421039.92, "cum_epochs": 1421039.92,
             "warning": "1421039.9 passes over this source by the end of stage1 (> 4)"}] * 2
    text = format_plan(rows)
    assert text.splitlines()[2].split() == ["stage1", "wiki", "56", "294.28k", "50.0%", "500.00B",
                                            "1421039.92", "1421039.92", "!"]
    buf = StringIO()
    Console(file=buf, width=80).print(plan_table(rows))
    table = buf.getvalue().splitlines()
    assert max(map(len, table)) <= 80 and table[1].split() == text.splitlines()[2].split()


def test_short_stage_shares_are_reported_per_stage_and_warned(demo, tok):
    """A 20/60/20 stage of a few thousand tokens after a long one: the accounting has each stage's shares next to their targets and warns where whole
    documents made them miss; the plan warns beforehand that the stage is shorter than a document."""
    from mixtures import plan_mixture

    st = PackedMixtureStream(demo, tok, seq_len=64, seed=0, stage="stage1")
    st.next_batch(64)
    st.set_stage("stage2")
    st.next_batch(16)
    acc = st.accounting()
    assert {s: a["stage_tokens"]["stage1"] for s, a in acc.items()} != {s: a["tokens"] for s, a in acc.items()}
    for a in acc.values():
        assert sum(a["stage_tokens"].values()) == a["tokens"]
    table = st.format_accounting()
    assert "stage1" in table.splitlines()[0] and "stage2" in table.splitlines()[0] and "(50%)" in table
    stage2 = {s: a["stage_tokens"]["stage2"] / sum(b["stage_tokens"]["stage2"] for b in acc.values())
              for s, a in acc.items()}
    if max(abs(stage2[s] - w) for s, w in zip(demo.source_names, demo.normalized_weights("stage2"))) > 0.05:
        assert "WARNING stage2/" in table
    resumed = PackedMixtureStream(demo, tok, seq_len=64, seed=0)
    resumed.load_state_dict(st.state_dict())
    assert resumed.accounting() == acc

    rows = plan_mixture(demo, tok, {"stage1": 32_768, "stage2": 16_384})
    wiki2 = next(r for r in rows if (r["stage"], r["source"]) == ("stage2", "wiki"))
    assert "less than one of its average documents" in wiki2["warning"]


# ------------------------------------------------------------------------- ties at a stage start
def test_stage_start_goes_to_the_source_the_stage_asks_most_of(demo, tok):
    """At a stage start every source has given 0 tokens: the tie goes to the largest deficit (the
    largest weight), not to the first source listed -- with whole documents and a short stage the
    first document decides much of the stage (a 20/60/20 stage 2 of 16K tokens came out 99.6%
    wiki). Ties later in the stage go the same way; the choice is a function of the saved state,
    so resume stays exact (test_resume_with_torch_save_and_mismatch_errors)."""
    from mixtures.sampler import TokenFairSampler

    sampler = TokenFairSampler(3)
    assert sampler.choose([0.2, 0.5, 0.3], [True] * 3) == 1
    sampler.add(1, 190)
    assert sampler.choose([0.2, 0.5, 0.3], [True] * 3) == 2      # 0 / 0.2 == 0 / 0.3: the larger weight
    assert sampler.choose([0.3, 0.5, 0.3], [True] * 3) == 0      # equal weights too: the first listed
    weights = demo.weights("stage2")
    first = PackedMixtureStream(demo, tok, seq_len=32, seed=9, stage="stage2").next_batch(1)["source_ids"][0, 0]
    assert int(first) == max(range(len(weights)), key=lambda i: weights[i]) != 0
