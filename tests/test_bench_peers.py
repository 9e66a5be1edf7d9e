"""bench/bench_peers.py at small CPU shapes: the weight copy and FLOP formula on our layer alone (always),
and our layer against each installed peer (skipped where torchtitan / OLMo-core are not installed, as in CI)."""
import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import bench_peers as bp  # noqa: E402

SMALL = ["--device", "cpu", "--dtype", "float32", "--tokens", "64", "--hidden", "64", "--intermediate", "32",
         "--experts", "8", "--top-k", "2", "--shared", "2", "--compile", "off", "--warmup", "0", "--iters", "1"]


def _args():
    return bp.parse_args(SMALL)


def _x(a, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, a.tokens, a.hidden, generator=g), torch.randn(1, a.tokens, a.hidden, generator=g)


def _reference(a, w, x):
    """dots1's MoE written out from the per-expert weights (shared/dots1.md), fp32."""
    x2 = x.reshape(-1, a.hidden)
    scores = (x2 @ w["router"].T).sigmoid()
    idx = (scores + w["bias"]).topk(a.top_k, -1).indices
    wt = scores.gather(1, idx)
    wt = wt / wt.sum(-1, keepdim=True) * bp.ROUTED_SCALE
    out = torch.zeros_like(x2)
    for t in range(x2.shape[0]):
        for k in range(a.top_k):
            e = idx[t, k]
            h = torch.nn.functional.silu(x2[t] @ w["gate"][e].T) * (x2[t] @ w["up"][e].T)
            out[t] += wt[t, k] * (h @ w["down"][e].T)
    s = torch.nn.functional.silu(x2 @ w["s_gate"].T) * (x2 @ w["s_up"].T)
    return (out + s @ w["s_down"].T).view_as(x)


def test_flop_formula_by_hand():
    # T=4, H=8, E=4, K=2, I=2, shared=1 (S=2): routed 6*4*2*8*2 = 768, shared 6*4*8*2 = 384, router 2*4*8*4 = 256
    f = bp.layer_flops(tokens=4, hidden=8, experts=4, top_k=2, intermediate=2, shared=1)
    assert f == dict(fwd=768 + 384 + 256, fwdbwd=3 * (768 + 384 + 256))


def test_weight_copy_into_ours_matches_dots1_reference():
    a = _args()
    w = bp.make_weights(a, "cpu")
    m = bp.build_ours(a, w, "torch", torch.float32, "cpu")
    x, _ = _x(a)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _reference(a, w, x), rtol=1e-5, atol=1e-5)
    # the random router bias changes the choice for some tokens (the check covers selection by score + bias)
    x2 = x.reshape(-1, a.hidden)
    plain = (x2 @ w["router"].T).topk(a.top_k, -1).indices.sort(-1).values
    assert (bp.ours_routing(m, x2).sort(-1).values != plain).any()


def test_main_without_peers_returns_our_rows(capsys):
    res = bp.main(SMALL + ["--peers", "none"])
    rows = res["rows"]
    assert [r["impl"] for r in rows][0] == "ours Dots1MoE[torch]"
    assert all(r["kind"] == "ours" and r["fwdbwd_ms"] > 0 for r in rows)
    assert rows[0]["out_rel"] == 0.0 and rows[0]["check"].startswith("ref")
    a = _args()
    assert res["flops"]["fwdbwd"] == 3 * (6 * a.tokens * a.top_k * a.hidden * a.intermediate
                                          + 6 * a.tokens * a.hidden * a.shared * a.intermediate
                                          + 2 * a.tokens * a.hidden * a.experts)
    assert rows[0]["tflops"] == pytest.approx(res["flops"]["fwdbwd"] / rows[0]["fwdbwd_ms"] / 1e9)
    assert res["best_peer_ms"] is None
    assert "ours Dots1MoE[torch]" in capsys.readouterr().out


def _ours_and_peer(peer_build, experts_bf16=False):
    a = _args()
    w = bp.make_weights(a, "cpu")
    ours = bp.build_ours(a, w, "torch", torch.float32, "cpu")
    if experts_bf16:  # the peer computes its experts in bf16: let ours do the same (our backends follow the weights)
        ours.experts.to(torch.bfloat16)
    peer = peer_build(a, w)
    x, dy = _x(a)
    res = []
    for m in (ours, peer):
        m.train()
        res.append(bp._fwd_bwd(m, x, dy))
    x2 = x.reshape(-1, a.hidden)
    return a, res, x2, ours, peer


def test_torchtitan_agrees_with_ours():
    if importlib.util.find_spec("torchtitan") is None:
        pytest.skip("torchtitan not installed")
    pytest.importorskip("torchtitan.models.common.moe")
    a, ((o1, dx1), (o2, dx2)), x2, ours, peer = _ours_and_peer(
        lambda a, w: bp.build_torchtitan(a, w, torch.float32, "cpu"), experts_bf16=True)
    assert torch.equal(bp.ours_routing(ours, x2).sort(-1).values, bp.torchtitan_routing(peer, x2).sort(-1).values)
    # torchtitan's GroupedExperts casts x and weights to bf16 always: ours runs its experts in bf16 too
    # (routing identical, fp32 router/shared/combine); what is left is bf16 rounding (~4e-3 / 5e-3 here)
    assert bp._maxrel(o2, o1) < 1e-2 and bp._maxrel(dx2, dx1) < 1e-2


def test_olmo_core_agrees_with_ours():
    if importlib.util.find_spec("olmo_core") is None:
        pytest.skip("olmo-core not installed")
    try:
        bp._import_olmo()
    except ImportError as e:
        pytest.skip(f"olmo_core.nn.moe.moe does not import: {e}")
    a, ((o1, dx1), (o2, dx2)), x2, ours, peer = _ours_and_peer(
        lambda a, w: bp.build_olmo(a, w, torch.float32, "cpu"))
    assert torch.equal(bp.ours_routing(ours, x2).sort(-1).values, bp.olmo_routing(peer, x2).sort(-1).values)
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx2, dx1, rtol=1e-5, atol=1e-5)
