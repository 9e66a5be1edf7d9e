"""Load a source's records through `datasets` and turn them into documents (strings).

A :class:`SourceData` holds the documents of one source with random access (``texts(idx)``),
split once into held-out documents and training documents. Records stay in Arrow (memory
mapped by `datasets`) and are rendered to text on access, so large local sources do not have
to fit in Python memory; text files split into documents with ``split_on`` are materialized.
Streaming sources (``data.streaming: true``) are `mixtures.streaming`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import warnings
import weakref
import zlib
from typing import Iterator, Sequence

import numpy as np

from ._files import MixtureWarning, first_bad_json_line, json_lines, quiet_datasets, root_msg
from .errors import MixtureError
from .spec import MixtureSpec, SourceSpec
from .streaming import StreamingSourceData

log = logging.getLogger("mixtures")


class SourceData:
    """The documents of one source, split into held-out and training documents.

    ``n_docs``: all valid documents; ``heldout_idx`` / ``train_idx``: sorted document indices
    (disjoint, together all documents); ``skipped``: bad records skipped (``on_bad_record: skip``).
    """

    def __init__(self, spec: SourceSpec, mixture: MixtureSpec):
        self.spec = spec
        self.where = f"{mixture.path}: source {spec.name!r}"
        self.skipped = 0
        self._docs: list[str] | None = None      # materialized documents (text sources)
        self._tables: list = []                  # (dataset, valid row indices) per file / hub split
        self._offsets = np.zeros(1, dtype=np.int64)
        self._load()
        if self.n_docs == 0:
            files = ", ".join(spec.data.files) or spec.data.hub
            raise MixtureError(f"{self.where}: no documents in {files}; check the file content, "
                               f"`text` ({spec.text!r}) and `data.split_on`")
        k = spec.heldout_docs
        if k >= self.n_docs:
            raise MixtureError(f"{self.where}: heldout_docs is {k} but the source has only "
                               f"{self.n_docs} documents; lower heldout_docs")
        rng = np.random.default_rng([mixture.heldout_seed, zlib.crc32(spec.name.encode())])
        ho = np.sort(rng.permutation(self.n_docs)[:k]).astype(np.int64)
        mask = np.ones(self.n_docs, dtype=bool)
        mask[ho] = False
        self.heldout_idx = ho
        self.train_idx = np.nonzero(mask)[0].astype(np.int64)

    streaming = False

    # ---------------------------------------------------------------- access
    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    def heldout_texts(self) -> list[str]:
        return self.texts(self.heldout_idx)

    @property
    def n_docs(self) -> int:
        return len(self._docs) if self._docs is not None else int(self._offsets[-1])

    def texts(self, idx: Sequence[int]) -> list[str]:
        """Documents by document index (0 <= i < n_docs), in the given order."""
        if self._docs is not None:
            return [self._docs[int(i)] for i in idx]
        idx = np.asarray(idx, dtype=np.int64)
        out: list[str | None] = [None] * len(idx)
        t = np.searchsorted(self._offsets, idx, side="right") - 1
        for ti in np.unique(t):
            sel = np.nonzero(t == ti)[0]
            ds, rows = self._tables[ti]
            local = rows[idx[sel] - self._offsets[ti]]
            batch = ds[[int(r) for r in local]]
            for j, k in enumerate(sel):
                out[k] = self._render({f: batch[f][j] for f in self.spec.text_fields})
        return out  # type: ignore[return-value]

    def train_texts(self, limit: int | None = None) -> Iterator[str]:
        idx = self.train_idx if limit is None else self.train_idx[:limit]
        for i in range(0, len(idx), 1000):
            yield from self.texts(idx[i:i + 1000])

    def _render(self, rec: dict) -> str:
        return self.spec.text.format_map(rec).strip()

    # ---------------------------------------------------------------- loading
    def _load(self) -> None:
        d = self.spec.data
        with quiet_datasets() as datasets:
            if d.hub is not None:
                try:
                    ds = datasets.load_dataset(d.hub, d.config, split=d.split, revision=d.revision)
                except Exception as e:  # noqa: BLE001 - re-raised with context
                    raise MixtureError(f"{self.where}: could not load hub dataset {d.hub!r} "
                                       f"(config {d.config!r}, split {d.split!r}): {root_msg(e)}; "
                                       f"it needs the internet or the HF cache (offline: point "
                                       f"data.path at local files)") from e
                self._add_table(ds, f"hub dataset {d.hub}", None)
            elif d.format == "text":
                self._load_text(datasets)
            else:
                for f in d.files:
                    self._add_table(self._load_file(datasets, f), f, f)
        if self.skipped:
            msg = (f"{self.where}: skipped {self.skipped} bad record(s) (on_bad_record: skip); "
                   f"{self.n_docs} documents kept")
            log.warning(msg)
            warnings.warn(msg, MixtureWarning, stacklevel=3)

    def _load_file(self, datasets, f: str):
        d = self.spec.data
        kwargs = {}
        if d.format == "csv" and d.csv_delimiter:
            kwargs["delimiter"] = d.csv_delimiter
        elif d.format == "csv" and f.endswith(".tsv"):
            kwargs["delimiter"] = "\t"
        if d.format != "json":   # an empty JSON-lines file is reported as an empty source below
            _refuse_empty(f, self.where)
        try:
            return datasets.load_dataset(d.format, data_files=[f], split="train", **kwargs)
        except Exception as e:  # noqa: BLE001 - diagnosed below
            if d.format != "json":
                raise MixtureError(f"{self.where}: could not read {f} as {d.format} "
                                   f"({type(e).__name__}: {root_msg(e)}); check the file or set "
                                   f"data.format") from e
            if next(json_lines(f), None) is None:
                return None          # an empty file: reported as an empty source if all are
            bad = first_bad_json_line(f)
            if bad is None:
                raise MixtureError(f"{self.where}: could not read {f} as JSON lines "
                                   f"({root_msg(e)}); each line must be one JSON object") from e
            line, why = bad
            if self.spec.on_bad_record == "fail":
                raise MixtureError(f"{self.where}: {f} line {line}: {why}; fix or delete the "
                                   f"line, or set `on_bad_record: skip` on this source to skip "
                                   f"bad records (they are counted and warned about)") from None
            # skip: read the lines through datasets' text loader, parse them one by one
            lines = datasets.load_dataset("text", data_files=[f], split="train")["text"]
            recs = []
            for line in lines:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict):
                    recs.append(obj)
                else:
                    self.skipped += 1
            return datasets.Dataset.from_list(recs) if recs else None

    def _add_table(self, ds, label: str, file: str | None) -> None:
        n = 0 if ds is None else len(ds)
        fields = self.spec.text_fields
        valid = np.zeros(0, dtype=np.int64)
        if n:
            missing = [f for f in fields if f not in ds.column_names]
            if missing:
                if self.spec.on_bad_record == "fail":
                    raise MixtureError(f"{self.where}: {label} has no field {missing[0]!r} (its "
                                       f"fields: {ds.column_names}); fix `text: {self.spec.text!r}`"
                                       f" or the data")
                self.skipped += n
                n = 0
            else:
                ds = ds.select_columns(list(fields))
                valid = self._valid_rows(ds, label, file)
        self._tables.append((ds, valid))
        self._offsets = np.append(self._offsets, self._offsets[-1] + len(valid))

    def _valid_rows(self, ds, label: str, file: str | None) -> np.ndarray:
        """Rows whose template fields are all present and whose text is not empty, checked with
        Arrow compute (no Python loop over the records)."""
        import string as _string

        import pyarrow as pa
        import pyarrow.compute as pc
        fields = self.spec.text_fields
        tbl = ds.with_format("arrow")[:]
        n = tbl.num_rows
        null = np.zeros(n, dtype=bool)
        for f in fields:
            null |= pc.is_null(tbl.column(f)).to_numpy(zero_copy_only=False)
        if null.any():
            first = int(np.argmax(null))
            if self.spec.on_bad_record == "fail":
                missing = [f for f in fields if tbl.column(f)[first].as_py() is None][0]
                raise MixtureError(
                    f"{self.where}: {label} {self._locate(file, first)} has no field {missing!r}; "
                    f"fix the record, fix `text: {self.spec.text!r}`, or set `on_bad_record: skip`")
            self.skipped += int(null.sum())
        literal = "".join(lit for lit, _, _, _ in _string.Formatter().parse(self.spec.text))
        empty = np.zeros(n, dtype=bool)
        if not literal.strip():
            # the text can only be empty if every field renders to whitespace: only strings can
            cols = [tbl.column(f) for f in fields]
            if all(pa.types.is_string(c.type) or pa.types.is_large_string(c.type) for c in cols):
                empty[:] = True
                for col in cols:
                    filled = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0)
                    empty &= ~pc.fill_null(filled, False).to_numpy(zero_copy_only=False)
            else:   # other types (numbers, datasets' Json columns of mixed values): render in Python
                for start in range(0, n, 4096):
                    batch = ds[start:start + 4096]
                    for j in range(len(batch[fields[0]])):
                        if not null[start + j]:
                            empty[start + j] = not self._render({f: batch[f][j] for f in fields})
            empty &= ~null
            self.skipped += int(empty.sum())
        return np.nonzero(~(null | empty))[0].astype(np.int64)

    def _locate(self, file: str | None, row: int) -> str:
        if file and self.spec.data.format == "json":
            for k, (n, _) in enumerate(json_lines(file)):
                if k == row:
                    return f"line {n}"
        return f"record {row} (0-based)"

    def _load_text(self, datasets) -> None:
        d = self.spec.data
        docs: list[str] = []
        pat = re.compile(d.split_on) if d.split_on else None
        for f in d.files:
            _refuse_empty(f, self.where)
            try:
                ds = datasets.load_dataset("text", data_files=[f], split="train", sample_by=d.sample_by)
            except Exception as e:  # noqa: BLE001
                raise MixtureError(f"{self.where}: could not read {f} as text ({root_msg(e)})") from e
            rows = ds["text"]
            if pat is None:
                docs.extend(t.strip() for t in rows if t.strip())
                continue
            cur: list[str] = []
            for line in rows:
                if pat.search(line) and cur:
                    text = "\n".join(cur).strip()
                    if text:
                        docs.append(text)
                    cur = []
                cur.append(line)
            text = "\n".join(cur).strip()
            if text:
                docs.append(text)
        self._docs = docs


_CACHE: "weakref.WeakKeyDictionary[MixtureSpec, list[SourceData]]" = weakref.WeakKeyDictionary()


def load_sources(spec: MixtureSpec) -> list:
    """Load every source of ``spec`` (cached per spec object)."""
    got = _CACHE.get(spec)
    if got is None:
        got = [StreamingSourceData(s, spec) if s.data.streaming else SourceData(s, spec)
               for s in spec.sources]
        _CACHE[spec] = got
    return got


def _refuse_empty(f: str, where: str) -> None:
    """An empty file: one line, instead of `datasets`' message about features."""
    if os.path.isfile(f) and os.path.getsize(f) == 0:
        raise MixtureError(f"{where}: {f} is empty; put documents in it, or remove the file from the source")
