"""Reading a mixture file: the YAML schema, its validation, and resolving names and paths.

A mixture is a YAML file::

    name: demo
    heldout_seed: 0                 # optional; fixes which documents are held out (not the training seed)
    sources:
      - name: wiki
        data: {path: ../data/wikitext2_valid.txt, format: text, split_on: "^ = [^=].* = $"}
        text: "{text}"              # a field name, or a template over fields: "Q: {question}\\nA: {answer}"
        weights: {warmup: 0.4, stable: 0.4, stage1: 0.7, stage2: 0.2, default: 0.0}
        on_exhausted: repeat        # repeat (new shuffle, epoch+1) | stop (drop, renormalize the others)
        on_bad_record: fail         # fail | skip (skipped records are counted and warned about)
        heldout_docs: 20            # documents kept out of training, for per-source eval loss

``data`` is either local files (``path``: a file, a glob, a directory, or a list of those,
relative to the YAML file) read through ``datasets.load_dataset(<format>, data_files=...)``,
or a hub dataset (``hub: org/name``, ``config``, ``split``, ``revision``) read through
``datasets.load_dataset(org/name, ...)``.

This module is the only place that knows the file's keys: it turns a bundled name, a path or a
dict into the records of :mod:`mixtures.spec`, with one :class:`MixtureError` per mistake that
names the file, the source and the fix. Stage semantics live with the records.
"""
from __future__ import annotations

import math
import os
import re
import string
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import MixtureError
from .spec import DataSpec, MixtureSpec, SourceSpec

FORMATS = ("text", "json", "parquet", "csv", "arrow")
_EXT_FORMAT = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow",
}
_COMPRESSION_EXT = (".gz", ".bz2", ".xz", ".zst", ".lz4")

_TOP_KEYS = {"name", "description", "sources", "heldout_seed"}
_SOURCE_KEYS = {"name", "data", "text", "weights", "on_exhausted", "on_bad_record", "heldout_docs"}
_DATA_KEYS = {"path", "format", "split_on", "sample_by", "hub", "config", "split", "revision",
              "streaming", "shuffle_buffer", "csv_delimiter"}


def bundled_mixtures() -> list[str]:
    """Names of the mixtures shipped in ``mixtures/mixtures/*.yaml``."""
    d = resources.files("mixtures") / "mixtures"
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))


def _resolve_mixture_path(name_or_path: str | os.PathLike) -> Path:
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.suffix in (".yaml", ".yml") or os.sep in s or "/" in s:
        if not p.is_file():
            raise MixtureError(f"mixture file {s!r} not found (cwd {os.getcwd()}); give a path to "
                               f"a YAML file or one of the bundled names {bundled_mixtures()}")
        return p.resolve()
    bundled = resources.files("mixtures") / "mixtures" / f"{s}.yaml"
    if bundled.is_file():
        return Path(str(bundled)).resolve()
    if p.is_file():
        return p.resolve()
    raise MixtureError(f"unknown mixture {s!r}: not a bundled mixture ({bundled_mixtures()}) and "
                       f"not a file; give a bundled name or a path to a YAML file")


def load_mixture(name_or_path: str | os.PathLike | dict, *, base_dir: str | None = None) -> MixtureSpec:
    """Read and validate a mixture: a bundled name (``"demo"``), a path to a YAML file, or a
    dict with the same content (paths then relative to ``base_dir`` or the cwd).

    Checks everything that can be checked without reading the data: keys, formats, that
    local files exist, weights. Data problems (missing field, corrupt line, empty source)
    are reported when the data is loaded. Raises :class:`MixtureError`.
    """
    if isinstance(name_or_path, dict):
        raw, where = name_or_path, "<mixture dict>"
        base = Path(base_dir or os.getcwd()).resolve()
    else:
        path = _resolve_mixture_path(name_or_path)
        where = str(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            loc = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
            raise MixtureError(f"{where}:{loc} is not valid YAML ({getattr(e, 'problem', e)}); "
                               f"fix the syntax there") from None
        base = path.parent
    return _parse(raw, where, base)


def _check_keys(d: dict, allowed: set, where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise MixtureError(f"{where}: unknown key(s) {extra}; allowed keys are {sorted(allowed)} "
                           f"(check the spelling)")


def _parse(raw: Any, where: str, base: Path) -> MixtureSpec:
    if not isinstance(raw, dict):
        raise MixtureError(f"{where}: a mixture must be a mapping with `name` and `sources`")
    _check_keys(raw, _TOP_KEYS, where)
    sources_raw = raw.get("sources")
    if not isinstance(sources_raw, list) or not sources_raw:
        raise MixtureError(f"{where}: `sources` must be a non-empty list of sources (each with `name`, "
                           "`data`, `text`, `weights`)")
    name = raw.get("name") or Path(where).stem
    seed = raw.get("heldout_seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise MixtureError(f"{where}: `heldout_seed` must be an integer, got {seed!r}")
    sources = []
    seen = set()
    for i, s in enumerate(sources_raw):
        src = _parse_source(s, i, where, base)
        if src.name in seen:
            raise MixtureError(f"{where}: two sources are named {src.name!r}; source names must be unique")
        seen.add(src.name)
        sources.append(src)
    spec = MixtureSpec(name=str(name), path=where, sources=tuple(sources), heldout_seed=seed,
                       description=str(raw.get("description", "")))
    if not spec.stage_names and not spec.has_default:
        raise MixtureError(f"{where}: no source gives any weights; add `weights: {{<stage>: <weight>}}`")
    for st in spec.stage_names:
        spec.weights(st)  # raises on all-zero
    return spec


def _parse_source(s: Any, i: int, where: str, base: Path) -> SourceSpec:
    if not isinstance(s, dict):
        raise MixtureError(f"{where}: sources[{i}] must be a mapping, got {type(s).__name__}")
    sname = s.get("name")
    if not isinstance(sname, str) or not sname.strip():
        raise MixtureError(f"{where}: sources[{i}] needs a `name` (a non-empty string)")
    w = f"{where}: source {sname!r}"
    _check_keys(s, _SOURCE_KEYS, w)
    data = _parse_data(s.get("data"), w, base)

    text = s.get("text", "{text}")
    if not isinstance(text, str) or not text:
        raise MixtureError(f"{w}: `text` must be a field name or a template like "
                           f"'{{question}}\\n{{answer}}', got {text!r}")
    if "{" not in text:
        text = "{" + text + "}"
    try:
        fields = tuple(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(text) if f is not None))
    except ValueError as e:
        raise MixtureError(f"{w}: `text` template {text!r} is malformed ({e}); use {{field}} for "
                           f"fields and {{{{ }}}} for literal braces") from None
    if not fields or any(f == "" or not re.fullmatch(r"[^\[\].!:]+", f) for f in fields):
        raise MixtureError(f"{w}: `text` template {text!r} must name fields, like '{{text}}' or "
                           f"'{{question}}\\n{{answer}}' (no positional or attribute fields)")
    if data.format == "text" and set(fields) != {"text"}:
        raise MixtureError(f"{w}: a `format: text` source has one field, `text`; set `text: "
                           f"\"{{text}}\"` (got {s.get('text')!r})")

    weights = s.get("weights")
    if not isinstance(weights, dict) or not weights:
        raise MixtureError(f"{w}: `weights` must be a mapping stage -> weight, e.g. "
                           f"{{stage1: 0.5, stage2: 0.2}}")
    clean = {}
    for k, v in weights.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MixtureError(f"{w}: weights.{k} must be a number, got {v!r}")
        if v < 0:
            raise MixtureError(f"{w}: weights.{k} is negative ({v}); weights must be >= 0 "
                               f"(use 0 to leave the source out of a stage)")
        clean[str(k)] = float(v)

    on_ex = s.get("on_exhausted", "repeat")
    if on_ex not in ("repeat", "stop"):
        raise MixtureError(f"{w}: on_exhausted must be `repeat` or `stop`, got {on_ex!r}")
    on_bad = s.get("on_bad_record", "fail")
    if on_bad not in ("fail", "skip"):
        raise MixtureError(f"{w}: on_bad_record must be `fail` or `skip`, got {on_bad!r}")
    ho = s.get("heldout_docs", 0)
    if isinstance(ho, bool) or not isinstance(ho, int) or ho < 0:
        raise MixtureError(f"{w}: heldout_docs must be an integer >= 0, got {ho!r}")
    return SourceSpec(name=sname, data=data, text=text, text_fields=fields, weights=clean,
                      on_exhausted=on_ex, on_bad_record=on_bad, heldout_docs=ho)


def _expand(pattern: str, base: Path, w: str) -> list[str]:
    p = Path(pattern).expanduser()
    if not p.is_absolute():
        p = base / p
    s = str(p)
    if any(c in s for c in "*?["):
        import glob
        hits = sorted(h for h in glob.glob(s, recursive=True) if os.path.isfile(h))
        if not hits:
            raise MixtureError(f"{w}: data.path glob {pattern!r} (resolved {s}) matches no file; "
                               f"fix the pattern (relative paths are relative to the mixture file)")
        return hits
    if p.is_dir():
        hits = sorted(str(h) for h in p.rglob("*") if h.is_file() and not h.name.startswith("."))
        if not hits:
            raise MixtureError(f"{w}: data.path directory {s} has no files")
        return hits
    if not p.is_file():
        raise MixtureError(f"{w}: data file {s} not found (data.path {pattern!r}; relative paths "
                           f"are relative to the mixture file); fix the path or add the file")
    return [str(p)]


def _detect_format(f: str) -> str | None:
    name = f.lower()
    for c in _COMPRESSION_EXT:
        if name.endswith(c):
            name = name[: -len(c)]
    return _EXT_FORMAT.get(os.path.splitext(name)[1])


def _parse_data(d: Any, w: str, base: Path) -> DataSpec:
    if isinstance(d, str):
        d = {"path": d}
    if not isinstance(d, dict):
        raise MixtureError(f"{w}: `data` must be a mapping like {{path: file.jsonl}} or "
                           f"{{hub: org/name, split: train}}")
    _check_keys(d, _DATA_KEYS, f"{w}: data")
    has_path, has_hub = d.get("path") is not None, d.get("hub") is not None
    if has_path == has_hub:
        raise MixtureError(f"{w}: `data` needs exactly one of `path` (local files) or `hub` "
                           f"(a hub dataset id)")
    fmt = d.get("format")
    if fmt == "jsonl":
        fmt = "json"
    if fmt is not None and fmt not in FORMATS:
        raise MixtureError(f"{w}: data.format {fmt!r} is not one of {list(FORMATS)} (or jsonl)")
    sample_by = d.get("sample_by", "line")
    if sample_by not in ("line", "paragraph", "document"):
        raise MixtureError(f"{w}: data.sample_by must be line, paragraph or document, got {sample_by!r}")
    split_on = d.get("split_on")
    if split_on is not None:
        try:
            re.compile(split_on)
        except re.error as e:
            raise MixtureError(f"{w}: data.split_on {split_on!r} is not a valid regex ({e})") from None
        if sample_by != "line":
            raise MixtureError(f"{w}: data.split_on works on lines; drop `sample_by` or set it to line")
    buf = d.get("shuffle_buffer", 10000)
    if isinstance(buf, bool) or not isinstance(buf, int) or buf < 1:
        raise MixtureError(f"{w}: data.shuffle_buffer must be an integer >= 1, got {buf!r}")
    streaming = d.get("streaming", False)
    if not isinstance(streaming, bool):
        raise MixtureError(f"{w}: data.streaming must be true or false, got {streaming!r}")
    if streaming and split_on is not None:
        raise MixtureError(f"{w}: data.split_on needs the whole text file; set streaming: false")
    common = dict(split_on=split_on, sample_by=sample_by, streaming=streaming, shuffle_buffer=buf,
                  csv_delimiter=d.get("csv_delimiter"))
    if has_hub:
        if split_on is not None and fmt not in (None, "text"):
            raise MixtureError(f"{w}: data.split_on only applies to text data")
        return DataSpec(hub=str(d["hub"]), config=d.get("config"), split=str(d.get("split", "train")),
                        revision=d.get("revision"), format=fmt, **common)
    paths = d["path"] if isinstance(d["path"], list) else [d["path"]]
    files: list[str] = []
    for p in paths:
        files.extend(_expand(str(p), base, w))
    files = list(dict.fromkeys(files))
    if fmt is None:
        fmts = {f: _detect_format(f) for f in files}
        unknown = [f for f, x in fmts.items() if x is None]
        if unknown:
            raise MixtureError(f"{w}: cannot tell the format of {unknown[0]} from its name; set "
                               f"data.format to one of {list(FORMATS)}")
        kinds = set(fmts.values())
        if len(kinds) > 1:
            raise MixtureError(f"{w}: data.path mixes formats {sorted(kinds)}; split it into one "
                               f"source per format or set data.format")
        fmt = kinds.pop()
    if split_on is not None and fmt != "text":
        raise MixtureError(f"{w}: data.split_on only applies to `format: text` data")
    return DataSpec(files=tuple(files), patterns=tuple(str(p) for p in paths), format=fmt, **common)
