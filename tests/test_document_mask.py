"""Intra-document attention (`model.document_mask`): a packed row of several documents gives the
logits, loss and gradients of its documents run one by one; without the mask it does not (so the
parity test can fail). CPU runs the dense-mask SDPA path (eager and under aot_eager); the
FlexAttention BlockMask is checked on CPU forward-only (FlexAttention has no CPU backward) and,
compiled, on CUDA (marked gpu)."""
import pytest
import torch
from torch._dynamo.utils import counters

from anneal.model.config import Dots1Config
from anneal.model.dots1 import Attention, Dots1ForCausalLM, build_document_mask
from moe.experts import available_backends

CFG = dict(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=8,
           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)
DOCS = (11, 19, 7)  # three documents of different lengths in one packed row


def _model(document_mask: bool, cfg=CFG, **kw) -> Dots1ForCausalLM:
    model = Dots1ForCausalLM(Dots1Config(**cfg), document_mask=document_mask, **kw)
    model.init_weights(seed=0)
    return model


def _packed(docs=DOCS, seed=0):
    """ids [1, S] of the packed row, position ids restarting at each document, and the targets:
    the next token inside the document, -100 (ignored) where the next token starts another one."""
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randint(0, CFG["vocab_size"], (n,), generator=gen) for n in docs]
    targets = torch.cat([torch.cat([p[1:], torch.tensor([-100])]) for p in parts])
    pos = torch.cat([torch.arange(n) for n in docs])
    return torch.cat(parts)[None], pos[None], targets[None], parts


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_packed_row_matches_documents_run_one_by_one(recompute):
    model = _model(document_mask=True, recompute=recompute).train()
    ids, pos, targets, parts = _packed()

    packed_logits = model(ids, pos)
    packed_loss = model.token_losses(ids, targets, pos).sum()  # ignored targets add 0
    packed_loss.backward()
    packed_grads = _grads(model)

    alone_logits, alone_loss = [], 0.0
    for p in parts:  # each document alone, positions from 0, plain causal attention
        alone_logits.append(model(p[None]))
        alone_loss = alone_loss + model.token_losses(p[None, :-1], p[None, 1:]).sum()
    alone_loss.backward()
    alone_grads = _grads(model)

    torch.testing.assert_close(packed_logits, torch.cat(alone_logits, dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_loss, alone_loss, atol=1e-5, rtol=1e-6)
    assert packed_grads.keys() == alone_grads.keys() and packed_grads
    for name, g in alone_grads.items():
        torch.testing.assert_close(packed_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_without_the_mask_later_documents_see_earlier_ones():
    """The control: attention crosses documents, so only the row's first document matches."""
    model = _model(document_mask=False).eval()
    ids, pos, _, parts = _packed()
    with torch.no_grad():
        packed = model(ids, pos)
        alone = torch.cat([model(p[None]) for p in parts], dim=1)
    first = DOCS[0]
    torch.testing.assert_close(packed[:, :first], alone[:, :first], atol=1e-5, rtol=1e-5)
    assert (packed[:, first:] - alone[:, first:]).abs().max() > 1e-2


def test_single_document_rows_equal_plain_causal():
    """Rows that are one document each: the mask is the causal mask, nothing else changes."""
    ids = torch.randint(0, CFG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(24).expand(2, -1)
    with torch.no_grad():
        masked = _model(document_mask=True).eval()(ids, pos)
        plain = _model(document_mask=False).eval()(ids, pos)
    torch.testing.assert_close(masked, plain, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose
def test_block_mask_and_dense_mask_give_the_same_attention():
    """The CUDA form (FlexAttention BlockMask) against the CPU form (dense mask, SDPA): one
    predicate. Forward only: FlexAttention has no CPU backward. Rows of different layouts, a
    length that is not a multiple of the 128-token block, a document running into the next row."""
    torch.manual_seed(0)
    attn = Attention(Dots1Config(**CFG)).eval()
    pos = torch.stack([torch.cat([torch.arange(n) for n in docs])
                       for docs in [(150, 40, 9), (3, 196), (199,)]])
    x = torch.randn(3, 199, CFG["hidden_size"])
    cos, sin = torch.ones(3, 199, CFG["head_dim"]), torch.zeros(3, 199, CFG["head_dim"])
    dense = build_document_mask(pos, flex=False)
    doc = (pos == 0).cumsum(-1)
    want = (doc[:, :, None] == doc[:, None, :]) & torch.ones(199, 199, dtype=torch.bool).tril()
    assert torch.equal(dense[:, 0], want)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin, build_document_mask(pos, flex=True)),
                                   attn(x, cos, sin, dense), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("grouped_mm" not in available_backends(), reason="grouped_mm not available")
def test_compiled_layers_with_the_mask_match_eager():
    """compile_layers (aot_eager: tracing and autograd, no code generation) with the mask passed
    into every compiled layer: same loss and gradients as eager, no graph break, and no recompile
    when the next micro-batch has other document boundaries (the mask is an input, not a constant)."""
    eager = _model(document_mask=True, experts_backend="grouped_mm").to_dtype(torch.bfloat16)
    compiled = _model(document_mask=True, experts_backend="grouped_mm").to_dtype(torch.bfloat16)
    compiled.compile_layers(backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()

    def loss_and_grads(model, docs, seed):
        ids, pos, targets, _ = _packed(docs, seed)
        losses = model.token_losses(ids, targets, pos)
        losses.sum().backward()
        return losses.detach(), _grads(model)

    want_loss, want_grads = loss_and_grads(eager, DOCS, 0)
    got_loss, got_grads = loss_and_grads(compiled, DOCS, 0)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-6)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-6, rtol=1e-6, msg=name)
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    graphs = counters["stats"]["unique_graphs"]
    loss_and_grads(compiled, (20, 5, 12), 1)  # same row length, other boundaries
    assert counters["stats"]["unique_graphs"] == graphs


# ---------------------------------------------------------------------------------- CUDA
CUDA_CFG = {**CFG, "hidden_size": 64, "head_dim": 16}  # FlexAttention's Triton kernel needs head_dim >= 16


def _cuda_model(compile_layers: bool):
    model = _model(document_mask=True, cfg=CUDA_CFG, experts_backend="grouped_mm").cuda().to_dtype(torch.bfloat16)
    if compile_layers:
        model.compile_layers()
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("compile_layers", [True, False], ids=["compiled", "eager_layers"])
def test_cuda_flex_packed_row_matches_documents_bf16(compile_layers):
    """The CUDA path (compiled FlexAttention with a BlockMask) in bf16: packed row vs its documents
    run one by one (plain causal SDPA), and vs the fp32 CPU reference."""
    model = _cuda_model(compile_layers)
    docs = (700, 1100, 248)  # 2048 tokens: whole and partial 128-token blocks on both sides of a boundary
    ids, pos, targets, parts = _packed(docs)
    packed_loss = model.token_losses(ids.cuda(), targets.cuda(), pos.cuda())
    alone = torch.cat([torch.cat([model.token_losses(p[None, :-1].cuda(), p[None, 1:].cuda()),
                                  torch.zeros(1, 1, device="cuda")], dim=1) for p in parts], dim=1)
    torch.testing.assert_close(packed_loss, alone, atol=3e-2, rtol=3e-2)
    assert abs(packed_loss.sum().item() - alone.sum().item()) / alone.sum().item() < 2e-3

    ref = _model(document_mask=True, cfg=CUDA_CFG)  # fp32 CPU, dense mask
    with torch.no_grad():
        want = ref.token_losses(ids, targets, pos)
    assert (packed_loss.float().cpu() - want).abs().mean() < 2e-2


@pytest.mark.gpu
def test_cuda_compiled_layers_have_no_graph_break_no_recompile_and_no_host_sync():
    """The mask is built outside the compiled layers (compiled create_block_mask) and passed in:
    no graph break, one graph for every document layout of a row shape, and the forward + backward
    never waits on the GPU (the micro-batch loop's promise, anneal.train.step)."""
    model = _cuda_model(compile_layers=True)
    torch._dynamo.reset()
    counters.clear()
    rows = [[t.cuda() for t in _packed(docs, seed)[:3]]
            for seed, docs in enumerate([(700, 1100, 248), (2000, 48), (2048,), (5, 2043)])]
    for i, (ids, pos, targets) in enumerate(rows[:3]):
        model.token_losses(ids, targets, pos).sum().backward()
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] == graphs
    ids, pos, targets = rows[3]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.token_losses(ids, targets, pos).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
