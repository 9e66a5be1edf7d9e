"""Training state without pickle: a tree of dicts, lists, tuples, numbers, strings, None and
tensors is stored as `<stem>.json` (the tree, each tensor replaced by a reference) next to
`<stem>.safetensors` (the tensors). Reading parses JSON and safetensors only, so resuming from or
exporting a checkpoint folder that someone else made cannot run their code (`torch.load` of a
pickle can). Anything else in the tree (an arbitrary object) is refused when it is written.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from anneal.checkpoints.atomic import atomic_write
from anneal.errors import AnnealError

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"  # markers in the JSON tree
_SCALARS = (bool, int, float, str, type(None))


class UnsafeStateError(AnnealError):
    """A state file that is not ours (a pickle, or not the JSON + safetensors format)."""


def _encode(obj, tensors: dict, seen: set, where: str):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        key = str(len(tensors))
        tensors[key] = t
        return {_TENSOR: key}
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, seen, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, seen, f"{where}.{k}") for k, v in obj.items()}
        return {_ITEMS: [[_encode(k, tensors, seen, where), _encode(v, tensors, seen, f"{where}[{k!r}]")]
                         for k, v in obj.items()]}
    raise TypeError(f"training state {where}: a {type(obj).__name__} cannot be stored without pickle; "
                    "store its plain fields instead")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def save_state(tree, stem: Path) -> list[Path]:
    """Write `tree` as stem.json (+ stem.safetensors when it holds tensors), each file atomically
    (temporary name + rename). Returns the files written."""
    stem = Path(stem)
    tensors: dict = {}
    skeleton = _encode(tree, tensors, set(), "")
    written = []
    if tensors:
        written.append(atomic_write(stem.with_name(stem.name + ".safetensors"),
                               lambda p: save_file(tensors, str(p), metadata={"format": "anneal-state"})))
    text = json.dumps(skeleton)
    written.append(atomic_write(stem.with_name(stem.name + ".json"), lambda p: p.write_text(text)))
    return written


def load_state(stem: Path):
    """Read what `save_state` wrote. A pickle (`<stem>.pt`) or a file that is not JSON/safetensors
    is refused with UnsafeStateError; nothing is executed."""
    stem = Path(stem)
    js, st = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")
    pickled = stem.with_name(stem.name + ".pt")
    if not js.exists():
        if pickled.exists():
            raise UnsafeStateError(
                f"{pickled}: a pickled training state (not written by anneal). anneal does not "
                "unpickle checkpoint files: unpickling can run arbitrary code. The weights in this folder "
                "are safetensors and can still be exported (anneal-export); resuming needs a checkpoint "
                "written by this version")
        raise AnnealError(f"{js} is missing: not a complete training checkpoint")
    try:
        skeleton = json.loads(js.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsafeStateError(f"{js} is not a JSON training state ({e.__class__.__name__}); refusing to read "
                               "it (nothing was executed)") from None
    try:
        tensors = load_file(str(st)) if st.exists() else {}
    except (SafetensorError, OSError) as e:
        raise UnsafeStateError(f"{st} is not a safetensors file ({e}); refusing to read it") from None
    try:
        return _decode(skeleton, tensors)
    except KeyError as e:
        raise AnnealError(f"{js} refers to tensor {e} that {st} does not hold: the state is torn; "
                          "resume from another checkpoint") from None


def state_bytes(tree) -> int:
    """Bytes the tensors of `tree` take (what writing it needs on disk, give or take the JSON)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(state_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(state_bytes(v) for v in tree)
    return 0
