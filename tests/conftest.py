import os
import sys

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-builds its CPU shared-memory comm op at init_distributed into torch's extension
# cache. The default (~/.cache/torch_extensions) is shared by every checkout on the machine; one
# whose venv has other include paths rebuilds it (about 80 s per process on 2 cores). One cache
# per environment keeps the build done once (inherited by spawned ranks and torchrun workers).
if os.access(sys.prefix, os.W_OK):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU (small shapes)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
