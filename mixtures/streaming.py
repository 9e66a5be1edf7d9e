"""Sources read in order through a `datasets` IterableDataset (``data.streaming: true``): hub
ids or local files, never all in memory."""
from __future__ import annotations

import logging
import warnings
import zlib
from typing import Iterator

import numpy as np

from ._files import MixtureWarning, first_bad_json_line, quiet_datasets, root_msg
from .errors import MixtureError
from .spec import MixtureSpec, SourceSpec

log = logging.getLogger("mixtures")


class StreamingSourceData:
    """A ``data.streaming: true`` source: records read in order through a ``datasets``
    IterableDataset (hub id or local files), never all in memory.

    * held-out documents: the first ``heldout_docs`` valid documents in the source's natural
      order (fixed; independent of the training seed); training reads the records after them.
    * epoch ``e``: ``IterableDataset.shuffle(seed, buffer_size=data.shuffle_buffer)`` with a
      seed from (training seed, source name, e): shard order and a buffer shuffle.
    * position ``p`` in an epoch is reached by reading the epoch's stream from its start, so a
      resume re-reads (does not re-tokenize) the documents before ``p`` of the current epoch:
      exact, and the cost is reading those records again.
    * ``n_train`` is unknown (None) until a first epoch has been read to its end.
    """

    streaming = True

    def __init__(self, spec: SourceSpec, mixture: MixtureSpec):
        self.spec = spec
        self.where = f"{mixture.path}: source {spec.name!r}"
        self.skipped = 0
        self.n_train: int | None = None
        d = spec.data
        with quiet_datasets() as datasets:
            try:
                if d.hub is not None:
                    ds = datasets.load_dataset(d.hub, d.config, split=d.split, revision=d.revision,
                                               streaming=True)
                else:
                    fmt = d.format
                    kwargs = {"sample_by": d.sample_by} if fmt == "text" else {}
                    if fmt == "csv" and d.csv_delimiter:
                        kwargs["delimiter"] = d.csv_delimiter
                    ds = datasets.load_dataset(fmt, data_files=list(d.files), split="train",
                                               streaming=True, **kwargs)
            except Exception as e:  # noqa: BLE001
                what = d.hub or ", ".join(d.files)
                hint = ("; a hub dataset needs the internet or the HF cache (offline: point "
                        "data.path at local files)" if d.hub else "")
                raise MixtureError(f"{self.where}: could not open {what} for streaming "
                                   f"({root_msg(e)}){hint}") from e
        self._ds = ds
        self._heldout: list[str] = []
        raw = 0
        it = self._records(ds)
        for rec_no, text in it:
            raw = rec_no + 1
            if text is None:
                continue
            if len(self._heldout) < spec.heldout_docs:
                self._heldout.append(text)
                continue
            break
        else:
            files = ", ".join(d.files) or d.hub
            if not self._heldout:
                raise MixtureError(f"{self.where}: no documents in {files}; check the data and "
                                   f"`text` ({spec.text!r})")
            raise MixtureError(f"{self.where}: heldout_docs is {spec.heldout_docs} but the source "
                               f"has only {len(self._heldout)} documents; lower heldout_docs")
        self._skip_raw = raw - 1      # records before the first training document

    def heldout_texts(self) -> list[str]:
        return list(self._heldout)

    def _records(self, ds):
        """(record number, text or None for a skipped record)."""
        fields = self.spec.text_fields
        n = -1
        try:
            for n, rec in enumerate(ds):
                vals = {f: rec.get(f) for f in fields}
                bad = [f for f, v in vals.items() if v is None]
                if bad:
                    if self.spec.on_bad_record == "fail":
                        raise MixtureError(
                            f"{self.where}: record {n} (0-based, in stream order) has no field "
                            f"{bad[0]!r} (its fields: {sorted(rec)}); fix the data or `text: "
                            f"{self.spec.text!r}`, or set `on_bad_record: skip`")
                    self._skip_one()
                    yield n, None
                    continue
                text = self.spec.text.format_map(vals).strip()
                if not text:
                    self._skip_one()
                yield n, (text or None)
        except MixtureError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt record inside datasets' reader
            where = ""
            if self.spec.data.format == "json":
                for f in self.spec.data.files:
                    bad = first_bad_json_line(f)
                    if bad:
                        where = f" ({f} line {bad[0]}: {bad[1]})"
                        break
            raise MixtureError(f"{self.where}: reading record {n + 1} failed{where}: {root_msg(e)}; "
                               f"fix the data (on_bad_record: skip cannot skip unreadable records "
                               f"with streaming: true; use streaming: false for that)") from e

    def _skip_one(self) -> None:
        self.skipped += 1
        if self.skipped == 1:
            msg = (f"{self.where}: skipping bad/empty records (on_bad_record: skip); the count is "
                   f"in the stream's accounting")
            log.warning(msg)
            warnings.warn(msg, MixtureWarning, stacklevel=4)

    def iter_epoch(self, seed: int, epoch: int) -> Iterator[str]:
        """Training documents of ``epoch`` in that epoch's order."""
        s = int(np.random.default_rng([seed, zlib.crc32(self.spec.name.encode()), epoch])
                .integers(0, 2**32 - 1))
        ds = self._ds.skip(self._skip_raw).shuffle(seed=s, buffer_size=self.spec.data.shuffle_buffer)
        with quiet_datasets():
            for _, text in self._records(ds):
                if text is not None:
                    yield text

    def train_texts(self, limit: int | None = 100_000) -> Iterator[str]:
        """Training documents in natural order (at most ``limit``: for tokenizer training/plans)."""
        n = 0
        for _, text in self._records(self._ds.skip(self._skip_raw)):
            if text is None:
                continue
            if limit is not None and n >= limit:
                return
            n += 1
            yield text

