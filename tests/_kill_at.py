"""`python tests/_kill_at.py POINT N [anneal overrides...]`: run `anneal` and SIGKILL it the N-th
time it reaches POINT (test_resume.py's fault injection; nothing here is part of anneal):
  step    a forward pass of the model (a micro-batch of a training step, or an eval)
  write   DCP has written this rank's checkpoint files, before the trainer state and the marker
  commit  the step folder is renamed into place, before ckpt/latest is rewritten
  export  the first weight shard of the final export is on disk, before the folder is published
"""
import os
import signal
import sys

from anneal.checkpoints import dcp_io, discovery, hf_export
from anneal.model import dots1

point, target = sys.argv[1], int(sys.argv[2])
seen = [0]


def reached() -> None:
    seen[0] += 1
    if seen[0] == target:
        os.kill(os.getpid(), signal.SIGKILL)


def after(owner, name, when=lambda *a, **k: True):
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if point_is_before and when(*args, **kwargs):
            reached()
        out = real(*args, **kwargs)
        if not point_is_before and when(*args, **kwargs):
            reached()
        return out
    setattr(owner, name, wrapped)


point_is_before = point in ("step", "commit")
if point == "step":
    after(dots1.Dots1ForCausalLM, "token_losses")
elif point == "write":
    after(dcp_io, "save")
elif point == "commit":
    after(discovery, "atomic_write_text", when=lambda path, text: os.path.basename(path) == discovery.LATEST)
elif point == "export":
    after(hf_export, "save_shard")
else:
    raise SystemExit(f"unknown kill point {point}")

from anneal.cli import main  # noqa: E402

sys.argv = ["anneal", *sys.argv[3:]]
main()
