"""torch.distributed.checkpoint (DCP) for our checkpoints: 1-D chunks at arbitrary offsets, and a
reader that never runs code from the checkpoint folder.

Every tensor of a checkpoint is stored as a *global 1-D tensor* (the parameter flattened); each
rank contributes the pieces it owns as chunks `[offset, offset + n)` of it: a ZeRO fragment, its
experts' range of a stacked expert tensor, or the whole tensor (one process). DCP writes each
rank's chunks into that rank's own file (`__<rank>_0.distcp`) and the coordinator writes the
`.metadata` file (which chunk lives where). Loading asks for arbitrary ranges of the same global
tensors; DCP reads the overlapping parts of whatever chunks were saved: that is resharding
(another EP size, another DP world, another ZeRO partitioning, one process).

No pickle on load: DCP's `FileSystemReader.read_metadata` unpickles `.metadata` with
`pickle.load`. `SafeFileSystemReader` reads it with an unpickler that resolves only the classes a
DCP metadata file is made of (its dataclasses, torch.Size, dtypes, layouts, memory formats) and
refuses any other global with `UnsafeStateError` before anything is called. Tensor data is read by
DCP with `torch.load(weights_only=True)`; we never store non-tensor objects (DCP's BYTE_IO items,
which it reads with `torch.load(weights_only=False)`) and refuse to read one.
"""
from __future__ import annotations

import collections
import errno
import functools
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType, TensorWriteData
from torch.distributed.checkpoint.planner_helpers import (_create_read_items, _create_write_items,
                                                          create_read_items_for_chunk_list)

from anneal.checkpoints.state_io import UnsafeStateError
from anneal.errors import AnnealError

METADATA = ".metadata"


# ------------------------------------------------------------------------ metadata without code
def _allowed_globals() -> dict[tuple[str, str], object]:
    from torch.distributed.checkpoint import filesystem

    allowed = {}
    for mod in (dcp_md, filesystem):
        for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                     "TensorProperties", "MetadataIndex", "StorageMeta", "_StorageInfo", "_StoragePrefix"):
            if hasattr(mod, name):
                cls = getattr(mod, name)
                allowed[(cls.__module__, cls.__qualname__)] = cls
    for obj in (torch.Size, collections.OrderedDict):
        allowed[(obj.__module__, obj.__qualname__)] = obj
    for name in dir(torch):  # torch.float32, torch.strided, torch.contiguous_format, ...
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    import copyreg
    import pathlib

    # rebuilt from plain arguments by functions that only look names up (layout by name, memory
    # format enum by number) or build a path object (StorageMeta.checkpoint_id)
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING")] = dcp_md._MEM_FORMAT_ENCODING
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls

    allowed[("copyreg", "_reconstructor")] = copyreg._reconstructor  # protocol < 2 object rebuild
    allowed[("builtins", "object")] = object
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file)
        self.where, self.allowed = where, _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafeStateError(
                f"{self.where}: refers to {module}.{name}, which is not part of a DCP checkpoint's metadata; "
                "refusing to read it (nothing was executed). anneal reads checkpoint metadata with an "
                "allowlist: a folder someone else made cannot run code") from None

    def persistent_load(self, pid):
        raise UnsafeStateError(f"{self.where}: unexpected persistent object in checkpoint metadata; refusing it")


def read_metadata(path: Path) -> dcp_md.Metadata:
    """A DCP `.metadata` file, unpickled with the allowlist only (cached while the file is
    unchanged: the streamed export reads one expert at a time)."""
    path = Path(path)
    if not path.is_file():
        raise AnnealError(f"{path} is missing: not a complete checkpoint (DCP writes it after every rank's files)")
    st = path.stat()
    return _read_metadata(str(path), st.st_mtime_ns, st.st_size, st.st_ino)


@functools.lru_cache(maxsize=4)
def _read_metadata(path: str, mtime_ns: int, size: int, inode: int) -> dcp_md.Metadata:
    with open(path, "rb") as f:
        try:
            md = _MetadataUnpickler(f, str(path)).load()
        except UnsafeStateError:
            raise
        except Exception as e:  # truncated / not a pickle at all
            raise UnsafeStateError(f"{path}: not a DCP metadata file ({e.__class__.__name__}: {e}); "
                                   "refusing to read it") from None
    if not isinstance(md, dcp_md.Metadata):
        raise UnsafeStateError(f"{path}: holds a {type(md).__name__}, not DCP metadata; refusing it")
    return md


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with `.metadata` read through the allowlist (`read_metadata`)."""

    def read_metadata(self, *args, **kwargs) -> dcp_md.Metadata:
        rank = kwargs.get("rank")
        md = read_metadata(Path(self._get_metadata_path(rank)))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_md.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


# --------------------------------------------------------------------------------- planners
class _ChunkSavePlanner(DefaultSavePlanner):
    """Plain local tensors, each the chunk [offset, offset + numel) of a global 1-D tensor of
    `global_numel` elements (`chunks[fqn] = (offset, global_numel)`). With `splits[fqn] = n` the
    chunk is stored as separate items cut at multiples of n (one expert's numel): a reader of one
    expert then loads only that expert's items, never the whole stacked tensor."""

    def __init__(self, chunks: dict[str, tuple[int, int]], splits: dict[str, int] | None = None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks, self.splits = chunks, splits or {}
        self._views: dict[tuple[str, int], tuple[int, int]] = {}

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, t in self.state_dict.items():
            if fqn in self.chunks:
                offset, total = self.chunks[fqn]
                per = self.splits.get(fqn) or t.numel() or 1
                pos, end = offset, offset + t.numel()
                while pos < end:
                    stop = min(end, (pos // per + 1) * per)
                    self._views[(fqn, pos)] = (pos - offset, stop - pos)
                    chunk = dcp_md.ChunkStorageMetadata(offsets=torch.Size([pos]), sizes=torch.Size([stop - pos]))
                    items.append(WriteItem(index=dcp_md.MetadataIndex(fqn, torch.Size([pos])), type=WriteItemType.SHARD,
                                           tensor_data=TensorWriteData(
                                               chunk=chunk, properties=dcp_md.TensorProperties.create_from_tensor(t),
                                               size=torch.Size([total]))))
                    pos = stop
            else:
                items += _create_write_items(fqn, t)
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index):
        if index.fqn in self.chunks:
            start, n = self._views[(index.fqn, index.offset[0])]
            return self.state_dict[index.fqn].narrow(0, start, n)
        return super().lookup_object(index)


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Fill plain local tensors, each the range [offset, offset + numel) of a saved global 1-D
    tensor; DCP reads it from whichever saved chunks overlap it."""

    def __init__(self, chunks: dict[str, tuple[int, int]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks = chunks

    def create_local_plan(self):
        from torch.distributed.checkpoint.planner import LoadPlan

        requests = []
        for fqn, t in self.state_dict.items():
            md = self.metadata.state_dict_metadata.get(fqn)
            if md is None:
                raise AnnealError(f"checkpoint has no tensor {fqn!r}: it was written for another model")
            if not isinstance(md, dcp_md.TensorStorageMetadata):
                raise UnsafeStateError(f"checkpoint entry {fqn!r} is not a tensor; refusing to read it "
                                       "(non-tensor DCP entries are unpickled)")
            if fqn in self.chunks:
                offset, total = self.chunks[fqn]
                if tuple(md.size) != (total,) or offset + t.numel() > total:
                    raise AnnealError(f"checkpoint tensor {fqn!r} has {tuple(md.size)} elements; this model "
                                      f"needs [{offset}, {offset + t.numel()}) of {total}: another model shape")
                local = dcp_md.ChunkStorageMetadata(offsets=torch.Size([offset]), sizes=torch.Size([t.numel()]))
                requests += create_read_items_for_chunk_list(fqn, md, [local])
            else:
                if tuple(md.size) != tuple(t.size()):
                    raise AnnealError(f"checkpoint tensor {fqn!r} has shape {tuple(md.size)}, this model "
                                      f"{tuple(t.size())}: another model shape")
                requests += _create_read_items(fqn, md, t)
        return LoadPlan(requests)

    def load_bytes(self, read_item, value) -> None:
        raise UnsafeStateError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object; refusing it")

    def lookup_tensor(self, index):
        return self.state_dict[index.fqn]


# ----------------------------------------------------------------------------------- save / load
def _no_dist() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def save(folder: Path, tensors: dict[str, torch.Tensor], chunks: dict[str, tuple[int, int]],
         splits: dict[str, int] | None = None) -> None:
    """Collective (every rank, when a process group exists): write this rank's `tensors` into
    `folder`, each one either a chunk (`chunks`) of a global 1-D tensor or a whole tensor; a chunk
    with `splits[fqn] = n` is stored cut at multiples of n."""
    writer = FileSystemWriter(str(folder), single_file_per_rank=True, sync_files=True, thread_count=1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(tensors, storage_writer=writer, planner=_ChunkSavePlanner(chunks, splits), no_dist=_no_dist())
    except dcp.api.CheckpointException as e:
        raise _unwrap(e, f"writing checkpoint {folder}") from None


def load(folder: Path, tensors: dict[str, torch.Tensor], chunks: dict[str, tuple[int, int]],
         collective: bool = True) -> None:
    """Fill `tensors` (in place) from `folder`: each a range (`chunks`) of a saved global 1-D
    tensor, or a whole saved tensor. Collective unless `collective=False` (one process reads)."""
    md = read_metadata(Path(folder) / METADATA)  # refuse a foreign pickle here, before DCP reads anything
    files = sorted({info.relative_path for info in (md.storage_data or {}).values()})
    missing = [f for f in files if not (Path(folder) / f).is_file()]
    if missing:
        raise AnnealError(f"checkpoint {folder} lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: "
                          f"the files of {len(missing)} of the {len(files)} writing ranks are missing (an incomplete "
                          "copy?); copy the whole step folder, or resume from another step")
    reader = SafeFileSystemReader(str(folder))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, storage_reader=reader, planner=_ChunkLoadPlanner(chunks),
                     no_dist=(not collective) or _no_dist())
    except dcp.api.CheckpointException as e:
        raise _unwrap(e, f"reading checkpoint {folder}") from None


def _unwrap(e, what: str) -> Exception:
    """DCP gathers every rank's exception into one CheckpointException (each a bare exception or an
    (exception, traceback) pair): ours come back as they were, a full disk as ENOSPC (the callers
    turn it into DiskFullError), anything else as one AnnealError line naming the folder."""
    failures = {}
    for rank, exc in (getattr(e, "failures", {}) or {}).items():
        exc = exc[0] if isinstance(exc, tuple) and exc else exc
        failures[rank] = getattr(exc, "exception", exc)
    for rank, exc in sorted(failures.items()):
        if isinstance(exc, AnnealError):
            return exc
    for rank, exc in sorted(failures.items()):
        if isinstance(exc, OSError):
            return exc
    rank, first = next(iter(sorted(failures.items())), (None, e))
    text = " ".join(str(first).split())
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*", "", text)[:300]
    if what.startswith("writing"):
        if "No space left" in text or "file write failed" in text:
            return OSError(errno.ENOSPC, f"No space left on device ({text})")
        return AnnealError(f"{what}: rank {rank}: {text}. Nothing was committed: the previous checkpoint is intact; "
                           "check the disk (full, read-only, quota?) and resume with run.resume=true")
    if "weights_only" in text or not text:   # torch.load's advice to unpickle is not ours to give
        text = ""
    files = ", ".join(sorted(p.name for p in Path(what.rpartition(" ")[2]).glob("*.distcp"))[:4])
    return AnnealError(f"{what}: rank {rank}: {files or 'a rank file'} is truncated or not a checkpoint file "
                       f"({type(first).__name__}{': ' + text[:160] if text else ''}). Move this step folder aside and "
                       "resume (the newest other complete checkpoint is used), or copy the folder again")
