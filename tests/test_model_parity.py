"""Our Dots1ForCausalLM against transformers' on tiny random configs: same weights -> same logits,
loss and gradients (fp32)."""
import pytest
import torch
import transformers

from anneal.model.dots1 import Dots1ForCausalLM
from anneal.model.config import Dots1Config
from moe.layer import moe_layers

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, head_dim=8, rms_norm_eps=1e-5,
            rope_theta=10_000_000.0, routed_scaling_factor=2.5, norm_topk_prob=True)

CASES = {
    "mha_top6_shared": dict(num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8,
                            num_experts_per_tok=6, n_shared_experts=2),
    "gqa_top2_shared": dict(num_key_value_heads=2, first_k_dense_replace=1, n_routed_experts=8,
                            num_experts_per_tok=2, n_shared_experts=1),
    "gqa_2dense_top6": dict(num_key_value_heads=1, first_k_dense_replace=2, n_routed_experts=8,
                            num_experts_per_tok=6, n_shared_experts=2),
    "mha_top2_noshared_unnormed": dict(num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=6,
                                       num_experts_per_tok=2, n_shared_experts=0, norm_topk_prob=False),
}


def hf_config(kw: dict) -> transformers.Dots1Config:
    kw = dict(kw)
    theta = kw.pop("rope_theta")
    return transformers.Dots1Config(**kw, sliding_window=None, max_position_embeddings=512,
                                    rope_parameters={"rope_type": "default", "rope_theta": theta},
                                    attn_implementation="eager")


def hf_to_ours(hf_sd: dict) -> dict:
    """transformers 5 holds experts fused in memory: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    out = {}
    for k, v in hf_sd.items():
        if v is not None and v.numel() == 0:  # HF builds a zero-width shared MLP when n_shared_experts=0
            continue
        if k.endswith("mlp.experts.gate_up_proj"):
            out[k.replace("gate_up_proj", "w_gate_up")] = v.transpose(1, 2)
        elif k.endswith("mlp.experts.down_proj"):
            out[k.replace("down_proj", "w_down")] = v.transpose(1, 2)
        else:
            out[k] = v
    return out


def build_pair(kw: dict, seed: int):
    torch.manual_seed(seed)
    hf = transformers.Dots1ForCausalLM(hf_config(kw)).float().eval()
    with torch.no_grad():  # a non-zero correction bias: selection must use it, weights must not
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.3)
        for name, p in hf.named_parameters():
            if "experts" in name or name.endswith("gate.weight"):
                p.normal_(0, 0.2)
    ours = Dots1ForCausalLM(Dots1Config(**kw)).eval()
    missing = ours.load_state_dict(hf_to_ours(hf.state_dict()), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return hf, ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_loss_and_grads_match_transformers(case):
    kw = {**BASE, **CASES[case]}
    hf, ours = build_pair(kw, seed=hash(case) % 1000)
    ids = torch.randint(0, kw["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))

    out = hf(input_ids=ids, labels=ids)
    logits = ours(ids)
    assert (logits - out.logits).abs().max().item() <= 1e-4

    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(loss.item() - out.loss.item()) <= 1e-5

    out.loss.backward()
    loss.backward()
    hf_grads = hf_to_ours({k: p.grad for k, p in hf.named_parameters()})
    for k, p in ours.named_parameters():
        ref = hf_grads[k]
        assert ref is not None and p.grad is not None, k
        err = (p.grad - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"{k}: grad max abs err {err}"


def test_correction_bias_changes_selection_but_not_weights():
    """The bias steers which experts are picked; the combine weights are the unbiased scores."""
    kw = {**BASE, **CASES["gqa_top2_shared"]}
    _, ours = build_pair(kw, seed=3)
    router = ours.routers()[1]
    x = torch.randn(64, kw["hidden_size"])
    idx0, w0, scores = router(x)
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
        router.e_score_correction_bias[0] = 10.0  # expert 0 always selected
    idx1, w1, _ = router(x)
    assert (idx1 == 0).any(-1).all()
    picked = scores.gather(1, idx1)
    torch.testing.assert_close(w1, picked / picked.sum(-1, keepdim=True) * 2.5)


@pytest.mark.parametrize("backend", ["torch", "grouped_mm"])
def test_expert_backends_agree(backend):
    from moe.experts import available_backends
    if backend not in available_backends():
        pytest.skip(f"{backend} not available in this torch build")
    kw = {**BASE, **CASES["mha_top6_shared"]}
    _, ref = build_pair(kw, seed=5)
    _, other = build_pair(kw, seed=5)
    for layer in moe_layers(other):
        layer.experts.set_backend(backend)
    ids = torch.randint(0, kw["vocab_size"], (2, 9))
    a, b = ref(ids), other(ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for (k, p), (_, q) in zip(ref.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=k)
