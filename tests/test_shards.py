"""Per-rank data (mixtures/shards.py): each data shard tokenizes only its own documents, shards are
disjoint and cover every epoch, the rows depend on the number of shards and not on how they are
split over ranks, and a run resumes exactly, also on another number of ranks."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from mixtures import MixtureError, PackedMixtureStream, ShardedStream, load_mixture, rank_shards
from mixtures.sources import load_sources
from test_mixtures import demo, make_mixture, same, tok  # noqa: F401  (fixtures: the demo BPE)


@pytest.fixture()
def spec(tmp_path):
    return load_mixture(make_mixture(tmp_path, [
        dict(name="a", n_docs=41, weights={"s": 2}, on_exhausted="repeat"),
        dict(name="b", n_docs=30, weights={"s": 1}, on_exhausted="repeat", heldout_docs=2,
             data={"path": "b.jsonl", "streaming": True, "shuffle_buffer": 8}),
    ]))


def _recording(stream):
    """The texts this stream tokenizes (its fetcher's encoder, wrapped)."""
    seen = []
    enc = stream._fetcher.encode

    def encode(texts):
        seen.extend(texts)
        return enc(texts)
    stream._fetcher.encode = encode
    return seen


def test_shards_tokenize_disjoint_documents_that_cover_the_epoch(spec, tok):
    n_train = {"a": 41, "b": 30 - 2}
    seen = []
    for i in range(3):
        st = PackedMixtureStream(spec, tok, seq_len=16, seed=4, stage="s", shard=(i, 3), block_docs=4)
        texts = _recording(st)
        while min(a["documents"] for a in st.accounting().values()) < 12:   # past this shard's first epoch
            st.next_batch(2)
        epoch0 = {src: [t for t in texts if t.startswith(f"{src} doc")][:len(range(i, n, 3))]
                  for src, n in n_train.items()}
        seen.append(epoch0)
        # tokenized: only this shard's documents (plus at most one block read ahead per source)
        assert len(texts) <= st.accounting()["a"]["documents"] + st.accounting()["b"]["documents"] + 2 * 4
    for k, (src, n) in enumerate(n_train.items()):
        docs = [t for part in seen for t in part[src]]
        assert len(docs) == len(set(docs)) == n, src       # disjoint
        assert set(docs) == set(load_sources(spec)[k].train_texts()), src   # and together one whole epoch


def test_rows_depend_on_the_number_of_shards_not_on_the_ranks(spec, tok):
    kw = dict(seq_len=16, seed=2, stage="s", n_shards=2)
    one = ShardedStream(spec, tok, shards=range(2), **kw)                       # 1 rank, 2 shards
    ranks = [ShardedStream(spec, tok, shards=rank_shards(2, r, 2), **kw) for r in range(2)]
    for _ in range(6):
        a = one.next_batch(4)
        b = [r.next_batch(2) for r in ranks]
        assert all(torch.equal(a[k], torch.cat([b[0][k], b[1][k]])) for k in a)
    # one shard is exactly the whole-mixture stream of before
    whole = ShardedStream(spec, tok, shards=range(1), n_shards=1, seq_len=16, seed=2, stage="s")
    ref = PackedMixtureStream(spec, tok, seq_len=16, seed=2, stage="s")
    assert same([whole.next_batch(3) for _ in range(4)], [ref.next_batch(3) for _ in range(4)])
    assert one.merge_accounting([p for r in ranks for p in r.shard_accounting()]) == one.accounting()


def test_resume_exact_on_another_number_of_ranks(spec, tok):
    kw = dict(seq_len=16, seed=7, stage="s", n_shards=4)
    ref = ShardedStream(spec, tok, shards=range(4), **kw)
    want = [ref.next_batch(4) for _ in range(7)]
    ranks = [ShardedStream(spec, tok, shards=rank_shards(4, r, 2), **kw) for r in range(2)]
    for _ in range(3):
        for r in ranks:
            r.next_batch(2)
    saved = json.loads(json.dumps([st for r in ranks for st in r.state_dict()]))   # as the checkpoint keeps it
    for world in (1, 4):
        resumed = [ShardedStream(spec, tok, shards=rank_shards(4, r, world), **kw) for r in range(world)]
        for r in resumed:
            r.load_state_dict(saved)
        for w in want[3:]:
            got = [r.next_batch(4 // world) for r in resumed]
            assert all(torch.equal(w[k], torch.cat([g[k] for g in got])) for k in w)
    with pytest.raises(MixtureError, match=r"saved data state has 4 data shards .* reads 2"):
        ShardedStream(spec, tok, shards=range(2), n_shards=2, seq_len=16, seed=7, stage="s").load_state_dict(saved)
    from anneal.errors import AnnealError
    from anneal.checkpoints.run_checkpoints import restore_data

    with pytest.raises(AnnealError, match=r"has 4 data shard\(s\) but this run reads 2: resume with data.shards=4"):
        restore_data(ShardedStream(spec, tok, shards=range(1), n_shards=2, seq_len=16, seed=7, stage="s"), saved)


def test_background_workers_read_the_same_shard(spec, tok):
    ref = PackedMixtureStream(spec, tok, seq_len=16, seed=1, stage="s", shard=(1, 2))
    with PackedMixtureStream(spec, tok, seq_len=16, seed=1, stage="s", shard=(1, 2), num_workers=1,
                             block_docs=4, prefetch_blocks=2) as bg:
        assert same([bg.next_batch(3) for _ in range(8)], [ref.next_batch(3) for _ in range(8)])


def test_bad_shards_are_one_clear_error(spec, tok):
    from anneal.errors import AnnealError
    from anneal.parallel.layout import ParallelLayout
    from anneal.train.build import data_shards

    with pytest.raises(MixtureError, match="shard must be"):
        PackedMixtureStream(spec, tok, seq_len=16, shard=(2, 2))
    with pytest.raises(MixtureError, match="no training documents in epoch 0 for data shard 45 of 46"):
        PackedMixtureStream(spec, tok, seq_len=16, stage="s", shard=(45, 46)).next_batch(1)
    cfg = lambda shards, mbs: OmegaConf.create({"data": {"shards": shards}, "trainer": {"micro_batch_size": mbs}})  # noqa: E731
    assert data_shards(cfg(None, 1), ParallelLayout(world=4, rank=3)) == range(3, 4)
    assert data_shards(cfg(8, 2), ParallelLayout(world=4, rank=1)) == range(2, 4)
    with pytest.raises(AnnealError, match=r"data.shards=6 must be a positive multiple of the number of ranks \(4\)"):
        data_shards(cfg(6, 1), ParallelLayout(world=4, rank=0))
    with pytest.raises(AnnealError, match=r"trainer.micro_batch_size=3 must be a multiple of data.shards / ranks = 2"):
        data_shards(cfg(8, 3), ParallelLayout(world=4, rank=0))
