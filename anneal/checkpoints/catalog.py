"""The catalog of dots1 checkpoints (released and local) and resolving a name to a local folder.

The catalog is data (`conf/catalog.yaml`, installed as `anneal/conf/catalog.yaml`), so entries
are fixed without code; users add or override entries with their own YAML files of the same
format (`Catalog.load(extra_files=[...])`; user entries replace bundled ones by name).

    cat = Catalog.load()
    ckpt = cat.resolve("dots1.base")      # -> ResolvedCheckpoint(name, path, entry)
    ckpt = cat.resolve("/data/my_ckpt")   # a local folder is used as it is
    print(format_catalog_table(cat))

Resolving a hub entry calls `huggingface_hub.snapshot_download` (weights, config and tokenizer
files only) at the entry's `revision` (a branch, tag or commit); with HF_HUB_OFFLINE=1 (or
`offline=True`) only the local HF cache is used. `anneal-catalog` (anneal.checkpoint_cli) prints the catalog.

The intermediate dots.llm1 checkpoints are, per the maintainers, branches of the hub repo
`rednote-hilab/dots.llm1.base`. `anneal-catalog --refresh` (`refresh_catalog`) lists that repo's
branches and tags with `huggingface_hub.list_repo_refs` and writes one entry per ref into the user
catalog (`user_catalog_path()`: $XDG_CONFIG_HOME/anneal/catalog.yaml, by default
~/.config/anneal/catalog.yaml), which `Catalog.load` reads after the bundled one
(`anneal.checkpoints.catalog_refresh`).
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from anneal.errors import AnnealError
from anneal.paths import conf_dir, package_root
from mixtures.errors import MixtureError
from mixtures.tokens import format_tokens, parse_tokens

STAGES = ("stable", "pre-anneal", "post-anneal", "long-context", "sft")
FIELDS = ("name", "repo_id", "path", "revision", "tokens_seen", "stage", "lr", "verified", "notes")
# Files fetched from the hub for a checkpoint: config, weights, tokenizer; not .bin, figures, etc.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_TRUE = {"1", "on", "yes", "true"}


DOTS1_BASE_REPO = "rednote-hilab/dots.llm1.base"


def user_catalog_path() -> Path:
    """The user catalog `anneal-catalog --refresh` writes and `Catalog.load` reads when it exists."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "anneal" / "catalog.yaml"


def bundled_catalog_path() -> Path:
    """`anneal/conf/catalog.yaml` when installed; `conf/catalog.yaml` in a source checkout."""
    path = conf_dir() / "catalog.yaml"
    if not path.is_file():
        raise AnnealError(f"bundled checkpoint catalog not found at {path}; reinstall the package")
    return path


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    stage: str
    repo_id: str | None = None
    path: Path | None = None          # absolute (resolved when the catalog was read)
    revision: str | None = None
    tokens_seen: int | None = None
    lr: float | None = None
    verified: bool = False
    notes: str = ""
    source: str = ""                  # the catalog file that defined the entry

    @property
    def location(self) -> str:
        if self.path is not None:
            return str(self.path)
        if self.repo_id is not None:
            return self.repo_id + (f"@{self.revision}" if self.revision else "")
        return "(repo id unknown)"


@dataclass(frozen=True)
class ResolvedCheckpoint:
    name: str
    path: Path
    entry: CatalogEntry | None = None


# ---------------------------------------------------------------------------------------------
# Reading catalog files
# ---------------------------------------------------------------------------------------------
class _Entry(BaseModel):
    """One catalog entry as written in the YAML: pydantic checks the types and the constraints; the
    first failure becomes one line naming the file, the entry and the field (`_parse_entry`)."""
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    stage: Literal[STAGES]
    repo_id: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    path: Optional[str] = Field(None, pattern=r"\S")
    revision: Optional[Union[StrictStr, StrictInt]] = None
    tokens_seen: Optional[Union[StrictInt, StrictStr]] = None
    lr: Optional[float] = Field(None, ge=0, allow_inf_nan=False)   # "3e-4" (YAML 1.1: a string) is accepted
    verified: StrictBool = False
    notes: Optional[StrictStr] = None

    @field_validator("lr", mode="before")
    @classmethod
    def _no_bool(cls, v):
        if isinstance(v, bool):
            raise ValueError("a bool")
        return v

    @model_validator(mode="after")
    def _one_location(self):
        if self.repo_id is not None and self.path is not None:
            raise PydanticCustomError("both_locations", "and 'repo_id' are both set; give one of them")
        return self


# what each field must be, in the one-line error (pydantic's own wording names types, not intent)
_MUST = {
    "name": "is required (a non-empty string)",
    "stage": f"must be one of {', '.join(STAGES)}",
    "repo_id": "must be a hub repo id like 'owner/name'",
    "path": "must be a folder path string",
    "revision": "must be a branch, tag or commit string",
    "tokens_seen": "must be a token count like 10T or 1.2e12",
    "lr": "must be a non-negative number like 3.0e-4, or null",
    "verified": "must be true or false",
    "notes": "must be a string",
}


def _parse_entry(raw: Any, index: int, file: Path, base_dir: Path) -> CatalogEntry:
    where = f"{file}: entry {index}"
    if not isinstance(raw, dict):
        raise AnnealError(f"{where}: must be a mapping with name, stage and repo_id or path; got {raw!r}")
    if isinstance(raw.get("name"), str) and raw["name"].strip():
        where = f"{file}: entry '{raw['name']}'"
    try:
        e = _Entry.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        fld = str(first["loc"][0]) if first["loc"] else "path"
        if first["type"] == "extra_forbidden":
            close = difflib.get_close_matches(fld, FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            why = f"is not a catalog field{hint}; fields: {', '.join(FIELDS)}"
        elif first["type"] == "both_locations":
            why = first["msg"]
        elif first["type"] == "missing":
            why = _MUST[fld] if fld == "name" else f"is required: {_MUST[fld]}"
        else:
            why = f"{_MUST[fld]}; got {raw.get(fld)!r}"
        raise AnnealError(f"{where}: field '{fld}' {why}") from None
    path = None
    if e.path is not None:
        p = Path(os.path.expandvars(os.path.expanduser(e.path)))
        path = p if p.is_absolute() else (base_dir / p)
    tokens = None
    if e.tokens_seen is not None:
        try:
            tokens = parse_tokens(e.tokens_seen, what=f"{where}: field 'tokens_seen'")
        except MixtureError as err:
            raise AnnealError(str(err)) from None
        if tokens < 0:
            raise AnnealError(f"{where}: field 'tokens_seen' must be >= 0; got {tokens}")
    return CatalogEntry(name=e.name.strip(), stage=e.stage, repo_id=e.repo_id, path=path,
                        revision=None if e.revision is None else str(e.revision), tokens_seen=tokens, lr=e.lr,
                        verified=e.verified, notes=" ".join((e.notes or "").split()), source=str(file))


def read_catalog_file(file: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> list[CatalogEntry]:
    """Entries of one catalog YAML file (a mapping with a `checkpoints` list, or a bare list).
    Relative `path`s resolve against `base_dir` (default: the file's folder)."""
    import yaml

    file = Path(file)
    try:
        data = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise AnnealError(f"{file}: catalog file not found") from None
    except yaml.YAMLError as e:
        raise AnnealError(f"{file}: not valid YAML ({e})") from None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"checkpoints"})
        if unknown:
            raise AnnealError(f"{file}: unknown top-level key '{unknown[0]}'; a catalog file has one key, "
                              "'checkpoints', holding a list of entries")
        data = data.get("checkpoints")
    if not isinstance(data, list):
        raise AnnealError(f"{file}: expected 'checkpoints:' followed by a list of entries")
    base = Path(base_dir) if base_dir is not None else file.resolve().parent
    entries, seen = [], set()
    for i, raw in enumerate(data):
        entry = _parse_entry(raw, i, file, base)
        if entry.name in seen:
            raise AnnealError(f"{file}: entry '{entry.name}' is defined twice")
        seen.add(entry.name)
        entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------------
# The catalog
# ---------------------------------------------------------------------------------------------
@dataclass
class Catalog:
    entries: dict[str, CatalogEntry] = field(default_factory=dict)

    @classmethod
    def load(cls, extra_files: Iterable[str | os.PathLike] = ()) -> "Catalog":
        """The bundled catalog, the user catalog (`user_catalog_path()`, if it exists) and catalog
        files (later files override earlier by name)."""
        entries = {e.name: e for e in read_catalog_file(bundled_catalog_path(), base_dir=package_root())}
        user = user_catalog_path()
        for f in ([user] if user.is_file() else []) + list(extra_files):
            entries.update({e.name: e for e in read_catalog_file(f)})
        return cls(entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> CatalogEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise AnnealError(self._unknown_message(name)) from None

    def _unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return (f"checkpoint '{name}': not a folder on this machine and not a catalog name.{hint} "
                f"The catalog has {len(self)} entries; list them with `anneal-catalog`, or "
                "pass a local folder holding config.json and *.safetensors, or a hub id 'owner/name'.")

    # -- resolve -----------------------------------------------------------------------------
    def resolve(self, name_or_path: str | os.PathLike, *, offline: bool | None = None) -> ResolvedCheckpoint:
        """Local folder -> itself; catalog name -> its local folder or its hub snapshot
        (downloaded, or from the HF cache when offline); 'owner/name[@revision]' -> hub snapshot.
        The result is checked to hold config.json and safetensors weights."""
        text = os.fspath(name_or_path)
        local = Path(os.path.expanduser(text))
        if local.is_dir():
            return ResolvedCheckpoint(text, validate_checkpoint_folder(local), None)
        if text in self.entries:
            entry = self.entries[text]
            if entry.path is not None:
                if not entry.path.is_dir():
                    raise AnnealError(f"checkpoint '{entry.name}' (catalog {entry.source}): folder "
                                      f"{entry.path} does not exist. Create it, or fix the entry's 'path'.")
                return ResolvedCheckpoint(entry.name, validate_checkpoint_folder(entry.path), entry)
            if entry.repo_id is None:
                raise AnnealError(
                    f"checkpoint '{entry.name}' (catalog {entry.source}): its hub repo id is not known "
                    "(unverified). Run `anneal-catalog --refresh` online (it lists the branches of "
                    f"{DOTS1_BASE_REPO}, where the intermediate checkpoints live), or find the repo in the dots1 collection "
                    "(https://huggingface.co/collections/rednote-hilab/dotsllm1-68246aaaaba3363374a8aa7c), "
                    "then add an entry with the same name and its repo_id (and revision) to your own "
                    "catalog file, or pass a local folder.")
            path = _snapshot(entry.repo_id, entry.revision, offline, label=f"checkpoint '{entry.name}'")
            return ResolvedCheckpoint(entry.name, validate_checkpoint_folder(path), entry)
        looks_like_path = (text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1
                           or text.endswith("/"))
        if looks_like_path:
            raise AnnealError(f"checkpoint '{text}': folder does not exist. Pass an existing folder "
                              "holding config.json and *.safetensors, or a catalog name.")
        if _HUB_ID.match(text):
            repo_id, _, revision = text.partition("@")
            path = _snapshot(repo_id, revision or None, offline, label=f"checkpoint '{text}'")
            return ResolvedCheckpoint(text, validate_checkpoint_folder(path), None)
        raise AnnealError(self._unknown_message(text))

    # -- listing -----------------------------------------------------------------------------
    def rows(self) -> list[dict[str, str]]:
        """One dict per entry (strings, ready to print): name, stage, tokens, lr, location, verified."""
        return [{
            "name": e.name,
            "stage": e.stage,
            "tokens": format_tokens(e.tokens_seen) if e.tokens_seen is not None else "?",
            "lr": f"{e.lr:g}" if e.lr is not None else "?",
            "location": e.location,
            "verified": "yes" if e.verified else "no",
        } for e in self.entries.values()]


_COLUMNS = ("name", "stage", "tokens", "lr", "location", "verified")


def format_catalog_table(catalog: Catalog | None = None, *, plain: bool = False):
    """A `rich.table.Table` of the catalog (or a plain-text table when `plain=True` or rich is
    not installed)."""
    catalog = catalog if catalog is not None else Catalog.load()
    rows = catalog.rows()
    if not plain:
        try:
            from rich.table import Table
        except ImportError:
            plain = True
    if plain:
        widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in _COLUMNS}
        lines = ["  ".join(c.ljust(widths[c]) for c in _COLUMNS).rstrip(),
                 "  ".join("-" * widths[c] for c in _COLUMNS)]
        lines += ["  ".join(r[c].ljust(widths[c]) for c in _COLUMNS).rstrip() for r in rows]
        return "\n".join(lines)
    table = Table(title="dots1 checkpoints", caption="verified = repo id/revision checked against the hub; "
                  "locations in full below")
    for c in _COLUMNS[:-2] + _COLUMNS[-1:]:   # no location: a path folded mid-word cannot be copied
        table.add_column(c, justify="right" if c in ("tokens", "lr") else "left", no_wrap=c == "name",
                         overflow="fold")
    for r in rows:
        table.add_row(*(r[c] for c in _COLUMNS if c != "location"))
    return table


# ---------------------------------------------------------------------------------------------
# Folder checks and hub snapshots
# ---------------------------------------------------------------------------------------------
def validate_checkpoint_folder(path: str | os.PathLike) -> Path:
    """Check `path` holds config.json and safetensors weights; returns it. Cheap (no reads of
    the weights); `anneal.checkpoints.hf_load.load_hf_checkpoint` checks the tensors themselves."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise AnnealError(f"{path}: config.json is missing; a checkpoint folder needs config.json and "
                          "*.safetensors (an HF model folder)")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        others = sorted(p.name for p in path.glob("*.safetensors"))
        found = f" (found {others[:3]} but no index)" if others else ""
        raise AnnealError(f"{path}: model.safetensors (or model.safetensors.index.json with its shards) is "
                          f"missing{found}; a checkpoint folder needs safetensors weights")
    return path


def offline_from_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _snapshot(repo_id: str, revision: str | None, offline: bool | None, label: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = offline_from_env() if offline is None else offline
    rev_arg = f" --revision {revision}" if revision else ""
    how = (f"Download it with `huggingface-cli download {repo_id}{rev_arg}` (or `hf download "
           f"{repo_id}{rev_arg}`) on a machine with internet access and the same HF cache, or pass a "
           "local folder instead.")
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS,
                                 local_files_only=offline)
    except Exception as e:  # hub errors differ across huggingface_hub versions; name the cause
        kind = type(e).__name__
        if offline:
            raise AnnealError(f"{label}: {repo_id}{'@' + revision if revision else ''} is not in the local "
                              f"HF cache and offline mode is on (HF_HUB_OFFLINE). {how}") from None
        if kind in ("RepositoryNotFoundError", "GatedRepoError"):
            raise AnnealError(f"{label}: hub repo '{repo_id}' not found or not accessible ({kind}). Check "
                              "the repo id in the catalog, or log in (`huggingface-cli login`).") from None
        if kind == "RevisionNotFoundError":
            raise AnnealError(f"{label}: revision '{revision}' not found in hub repo '{repo_id}'. "
                              "Fix the catalog entry's revision.") from None
        raise AnnealError(f"{label}: could not download {repo_id}{'@' + revision if revision else ''} "
                          f"and it is not in the local HF cache ({kind}: {e}). {how}") from None
    return Path(path)
