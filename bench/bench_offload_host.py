"""Host memory of the offloaded optimizer: DeepSpeed's own update against the streamed one (issue 24).

Measured on a CPU, where it can be measured without a GPU: each case in a fresh process (gloo, one
rank), a dots1-shaped model with bf16 weights and fp32 gradient sums (the precision policy GPU runs
use, which is what makes ZeRO 2 keep the step's sum in one fp32 partition buffer), DeepSpeed ZeRO 2
with `parallel.offload=optimizer`, two optimizer steps of two micro-batches. The process's resident
size after the second step, for `offload_chunk_mb=0` (DeepSpeed's step: a whole fp32 gradient and a
whole bf16 upload copy of the partition on the host) and the streamed update (neither): the
difference is what the planner says the streamed update saves, 6 B per parameter of the partition
less its two chunk slots (anneal/host_plan.py). On a CPU the buffers a GPU would hold (bf16 weights, the fp32 partition sum)
are host memory too; they are the same in both cases and cancel in the difference.

    python bench/bench_offload_host.py --json bench/results/offload_host_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ARCH = dict(model_type="dots1", vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
            num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8, head_dim=128,
            n_routed_experts=16, num_experts_per_tok=6, n_shared_experts=2, routed_scaling_factor=2.5,
            norm_topk_prob=True, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=4096,
            tie_word_embeddings=False)


def run_case(chunk_mb: int, seq: int) -> dict:
    """In this process: build, train two steps, report the resident size (GiB)."""
    from types import SimpleNamespace

    import psutil
    import torch

    from anneal.model.config import Dots1Config
    from anneal.model.dots1 import Dots1ForCausalLM
    from anneal.model.precision import PrecisionPolicy
    from anneal.parallel import ds_engine

    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
    ds_engine.init_distributed("cpu")
    torch.manual_seed(0)
    model = Dots1ForCausalLM(Dots1Config.from_hf_dict(dict(ARCH)))
    model.init_weights(seed=0)
    with torch.no_grad():  # bf16-exact values, as a released checkpoint's: the engine keeps no fp32 copy
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    params = sum(p.numel() for p in model.parameters())
    tcfg = SimpleNamespace(micro_batch_size=1, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, grad_clip=1.0)
    engine = ds_engine.DeepSpeedEngine(model, tcfg, zero_stage=2, policy=PrecisionPolicy(torch.bfloat16),
                                       offload="optimizer", offload_chunk_mb=chunk_mb)
    gen = torch.Generator().manual_seed(0)
    rss_after = []
    for _ in range(2):
        for _ in range(2):
            ids = torch.randint(0, ARCH["vocab_size"], (1, seq + 1), generator=gen)
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            engine.backward(loss / 2)
        engine.step(1e-4)
        rss_after.append(psutil.Process().memory_info().rss / 2 ** 30)
    return {"offload_chunk_mb": chunk_mb, "streamed": engine.streamed, "params": params,
            "largest_partition": max(int(n) for n in engine.engine.optimizer.partition_size),
            "rss_gib_after_steps": rss_after, "describe": engine.describe()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--chunk-mb", type=int, default=16, help="the streamed case's parallel.offload_chunk_mb")
    ap.add_argument("--json", default=None)
    ap.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)  # one case, in a child process
    args = ap.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.case, args.seq)))
        return
    import torch

    import deepspeed

    cases = []
    for chunk_mb in (0, args.chunk_mb):
        out = subprocess.run([sys.executable, __file__, "--case", str(chunk_mb), "--seq", str(args.seq)],
                             capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "MASTER_PORT": str(29700 + chunk_mb % 100)})
        if out.returncode:
            raise SystemExit(f"case offload_chunk_mb={chunk_mb} failed:\n{out.stderr[-3000:]}")
        cases.append(json.loads(out.stdout.strip().splitlines()[-1]))
    own, streamed = cases
    saved = own["rss_gib_after_steps"][-1] - streamed["rss_gib_after_steps"][-1]
    # the planner's rows (anneal/host_plan.py): the whole fp32 gradient and bf16 copy (6 B per parameter)
    # go, two slots of one chunk (fp32 + bf16) come
    slots = 2 * 6 * min(args.chunk_mb * 2 ** 18, streamed["largest_partition"])
    planned = (6 * own["params"] - slots) / 2 ** 30
    for c in cases:
        print(f"offload_chunk_mb={c['offload_chunk_mb']:>3} ({'streamed' if c['streamed'] else 'DeepSpeed step'}): "
              f"{c['params'] / 1e6:.0f}M parameters, resident after step 1 / 2: "
              + " / ".join(f"{r:.2f}" for r in c["rss_gib_after_steps"]) + " GiB")
    print(f"saved by streaming: {saved:.2f} GiB measured, {planned:.2f} GiB planned (6 B per parameter less "
          f"{slots / 2 ** 30:.2f} GiB of slots): {saved / planned - 1:+.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "cpus": os.cpu_count(), "arch": ARCH, "seq": args.seq, "cases": cases,
            "saved_gib": saved, "planned_gib": planned, "slots_gib": slots / 2 ** 30}, indent=1))


if __name__ == "__main__":
    main()
