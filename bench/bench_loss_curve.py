"""Issue 14: the training slice's loss curve with two experts backends (same init, same batches).

The bench_step slice (hidden 4096, 1 dense + 3 MoE layers of 16 experts top-6, seq 4096), compiled,
bf16 policy, native engine, 4 micro-batches of 2 rows per step; prints each backend's losses and the
largest difference. Gradient accumulation as the trainer's default (`trainer.grad_accum_fusion`: fused)
or the fp32 hook with a third argument `hook`. CUDA only.

    python3 bench/bench_loss_curve.py grouped_mm,triton 12          # fused accumulation
    python3 bench/bench_loss_curve.py grouped_mm,triton 12 hook     # the fp32 hook (runs before 2026-12-07)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from anneal.config import TrainerCfg  # noqa: E402
from anneal.model.config import Dots1Config  # noqa: E402
from anneal.model.dots1 import Dots1ForCausalLM  # noqa: E402
from anneal.model.precision import PrecisionPolicy  # noqa: E402
from anneal.train.engine import Engine  # noqa: E402
from anneal.train.step import accumulate  # noqa: E402
from bench.bench_step import slice_arch  # noqa: E402

args = SimpleNamespace(vocab=4096, dense_layers=1, moe_layers=3, experts=16, top_k=6, seq=4096)
steps, n_micro = int(sys.argv[2]), 4
fusion = TrainerCfg().grad_accum_fusion if len(sys.argv) < 4 else sys.argv[3] != "hook"
print("gradient accumulation:", "fused" if fusion else "fp32 hook", flush=True)
out = {}
for backend in sys.argv[1].split(","):
    torch.manual_seed(0)
    model = Dots1ForCausalLM(Dots1Config.from_hf_dict(slice_arch(args)), backend)
    model.init_weights(seed=0)
    model.cuda().train()
    policy = PrecisionPolicy.for_device(True, torch.device("cuda"), fusion=fusion)
    engine = Engine(model, OmegaConf.structured(TrainerCfg(micro_batch_size=2)), policy)
    model.compile_layers()
    gen = torch.Generator().manual_seed(1)
    losses = []
    t0 = time.time()
    for s in range(steps):
        batches = [{"input_ids": (ids := torch.randint(0, 4096, (2, 4097), generator=gen)),
                    "position_ids": torch.arange(4097).expand(2, -1).contiguous(), "source_ids": torch.zeros_like(ids)}
                   for _ in range(n_micro)]
        sums = accumulate(model, engine, iter(batches), n_micro, 1, torch.device("cuda"))
        engine.step(3e-4 if s else 1e-5)
        losses.append(float(sums["loss_sum"].sum() / sums["count"].sum()))
    out[backend] = losses
    print(backend, f"{time.time() - t0:.0f}s", " ".join(f"{l:.4f}" for l in losses), flush=True)
    del model, engine
    torch.cuda.empty_cache()
b = list(out)
print("max |diff|", max(abs(x - y) for x, y in zip(out[b[0]], out[b[1]])))
