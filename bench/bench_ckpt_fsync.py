"""What the durable checkpoint commit costs (issue 21): `save_checkpoint` of a checkpoint of
--gb gigabytes (fp32 masters + AdamW's two moments, as an engine's pieces; the dots1 slice's is
about 16 GB) with fsync (what anneal does: DCP's sync_files, then every file of the step folder,
the folder, ckpt/ and ckpt/latest) and without (all fsyncs skipped), alternating, --repeats each.

    python bench/bench_ckpt_fsync.py --gb 16 --dir /local/disk/folder --out bench/results/ckpt_fsync.json

The tensors live on the GPU when there is one (DCP copies them to the host while writing, as in a
run). Each save writes a new step folder and prunes the previous one (keep=1), so the disk needs
about 2 x --gb free.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from anneal.checkpoints import dcp_io, discovery, training_state


def pieces(gb: float, n_tensors: int, device: str) -> list[training_state.Piece]:
    per = int(gb * 1e9 / 12 / n_tensors)          # 4 bytes x (master + exp_avg + exp_avg_sq)
    out = []
    for i in range(n_tensors):
        value = torch.randn(per, device=device)
        out.append(training_state.Piece(f"model.layers.{i}.weight", (per,), 0, value,
                                        torch.randn_like(value), torch.rand_like(value)))
    return out


class _NoFsync:
    """Skip every fsync of the commit (the 'before issue 21' durability)."""

    def __enter__(self):
        self.fsync_path, self.writer = discovery.fsync_path, dcp_io.FileSystemWriter
        discovery.fsync_path = lambda path: None
        real = self.writer
        dcp_io.FileSystemWriter = lambda *a, **k: real(*a, **{**k, "sync_files": False})
        return self

    def __exit__(self, *exc):
        discovery.fsync_path, dcp_io.FileSystemWriter = self.fsync_path, self.writer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=16.0)
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/anneal-bench-ckpt")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ps = pieces(args.gb, args.tensors, device)
    root = Path(args.dir)
    times: dict[str, list[float]] = {"fsync": [], "no_fsync": []}
    step = 0
    for _ in range(args.repeats):
        for mode in ("fsync", "no_fsync"):
            step += 1
            t = time.perf_counter()
            if mode == "fsync":
                training_state.save_checkpoint(root, step, ps, {}, {"step": step}, {}, keep=1)
            else:
                with _NoFsync():
                    training_state.save_checkpoint(root, step, ps, {}, {"step": step}, {}, keep=1)
            times[mode].append(time.perf_counter() - t)
            print(f"{mode:9s} step {step}: {times[mode][-1]:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"gb": args.gb, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "dir": str(root), "seconds": times, "median_s": med,
              "fsync_overhead": med["fsync"] / med["no_fsync"] - 1}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
