"""What a resume continues: the run's own settings, replayed from its saved overrides record; the
settings changed on top of them (refused for those that cannot change within a run, recorded in
`config.yaml` as a `resumes:` history otherwise); and a trainer state checked against the run
before anything is restored.

The overrides record is Hydra's own layout, `<run>/.hydra/overrides.yaml` (the command-line
overrides, one per line) next to `<run>/.hydra/config.yaml` (the composed config). We write it
ourselves, after the run-folder check (Hydra would write it before, over the record of the run
being resumed): see `hydra.output_subdir: null` in conf/config.yaml.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from anneal.checkpoints.discovery import STATE, step_dir_name
from anneal.errors import AnnealError

RECORD_DIR = ".hydra"
OVERRIDES = "overrides.yaml"
COMPOSED = "config.yaml"
# recipe=NAME a recipe file was rewritten into by the CLI (anneal.cli): NAME -> the file the user gave
RECIPE_FILES: dict[str, str] = {}
# keys that fix what the run trains on and from: a resume that changes one is refused
FIXED = ("checkpoint", "catalog_files", "seed", "model.arch", "model.init_seed", "data.mixture", "data.seq_len",
         "data.shards", "data.tokenizer", "data.tokenizer_vocab_size", "schedule.batch_tokens")
# keys that say where and how loudly a run runs, not what it trains: never listed as changes
_NOT_SETTINGS = ("run.", "resumes", "logging.progress", "trainer.threads", "trainer.stop_after_steps",
                 "trainer.profile_steps")
# what one invocation says, not the run: never recorded nor replayed
PER_INVOCATION = ("run.", "trainer.stop_after_steps", "trainer.profile_steps", "hydra.")
_TRUE = ("true", "1", "yes", "on")


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _value(args: list[str], key: str) -> str | None:
    """The value the last `key=...` of `args` gives, as Hydra reads it (quotes and escapes undone)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    found = [a for a in args if "=" in a and not a.startswith("-") and _key(a) == key]
    if not found:
        return None
    try:
        value = OverridesParser.create().parse_overrides([found[-1]])[0].value()
    except Exception as e:  # Hydra reports the bad override itself, with its grammar's message
        raise AnnealError(f"{found[-1]}: not a valid override ({' '.join(str(e).split())[:200]})") from None
    return None if value is None else str(value)


def is_resume(args: list[str]) -> bool:
    return (_value(args, "run.resume") or "").lower() in _TRUE


def replay_saved_overrides(args: list[str], default_root: str = "runs") -> tuple[list[str], str | None]:
    """The command line of a `run.resume=true`: the run's saved overrides first, then `args`
    (which win key by key). Returns (args, a note saying what was replayed, or None)."""
    if not is_resume(args):
        return args, None
    name = _value(args, "run.name")
    if not name:
        raise AnnealError("run.resume=true needs run.name=NAME (and run.root=DIR unless it is "
                          f"'{default_root}'): the run folder to continue; without it the run gets a new "
                          "timestamped folder")
    record = Path(_value(args, "run.root") or default_root) / name / RECORD_DIR / OVERRIDES
    if not record.is_file():
        return args, None   # a run without a record (older version) or none at all: claim_run_dir decides
    saved = load_overrides(record)
    given = {_key(a) for a in args if "=" in a and not a.startswith("-")}
    replayed = [o for o in saved if _key(o) not in given and not _key(o).startswith(PER_INVOCATION)]
    note = f"run.resume=true: replaying this run's overrides from {record}" + (
        f": {' '.join(replayed)}" if replayed else " (none)")
    return [*replayed, *args], note


def load_overrides(record: Path) -> list[str]:
    try:
        saved = yaml.safe_load(Path(record).read_text()) or []
    except (OSError, yaml.YAMLError) as e:
        raise AnnealError(f"{record}: not readable as a YAML list of overrides ({e.__class__.__name__}); "
                          "restore it, or delete it to resume with the command line's settings only") from None
    if not isinstance(saved, list) or not all(isinstance(o, str) for o in saved):
        raise AnnealError(f"{record}: must be a YAML list of key=value strings")
    return saved


def command_line_overrides() -> list[str]:
    """The overrides of the running `anneal` job (a recipe file by the path the user gave, not the
    temporary search-path entry the CLI made for it); [] outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    out = []
    for o in HydraConfig.get().overrides.task:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "hydra.searchpath":
            continue
        if key.lstrip("+~") == "recipe" and value in RECIPE_FILES:
            o = f"{key}={RECIPE_FILES[value]}"
        out.append(o)
    return out


def write_record(run_dir: Path, overrides: list[str], cfg) -> None:
    """<run>/.hydra/{overrides.yaml, config.yaml} (without what only one invocation says: PER_INVOCATION)."""
    from omegaconf import OmegaConf

    from anneal.checkpoints.atomic import atomic_write_text

    folder = Path(run_dir) / RECORD_DIR
    folder.mkdir(exist_ok=True)
    kept = [o for o in overrides if not _key(o).startswith(PER_INVOCATION)]
    atomic_write_text(folder / OVERRIDES, yaml.safe_dump(kept, default_flow_style=False, allow_unicode=True))
    atomic_write_text(folder / COMPOSED, OmegaConf.to_yaml(cfg, resolve=False))


def merge_overrides(saved: list[str], new: list[str]) -> list[str]:
    keys = {_key(o) for o in new}
    return [o for o in saved if _key(o) not in keys] + list(new)


# ------------------------------------------------------------------------------- changed settings
def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and any(isinstance(v, (dict, list)) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): tree}


def config_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for every setting that differs."""
    a, b = _flat(saved), _flat(current)
    keys = sorted(k for k in set(a) | set(b) if not k.startswith(_NOT_SETTINGS))
    return [(k, a.get(k), b.get(k)) for k in keys if json.dumps(a.get(k)) != json.dumps(b.get(k))]


def check_changes(changes, config_file: Path) -> None:
    for key, old, new in changes:
        if key.startswith(FIXED):
            raise AnnealError(f"run.resume=true: {key} was {old!r} in this run ({config_file}) and is {new!r} now; "
                              "it fixes what the run trains on and cannot change within a run. Drop the override, "
                              "or start a new run (run.name=...) from this run's export")


def format_changes(changes) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)


def resumes_entry(step: int, changes) -> dict:
    return {"step": step, "changed": [{"key": k, "from": old, "to": new} for k, old, new in changes]}


# ------------------------------------------------------------------------------- trainer state
def validate_trainer_state(state, path: Path, seq_len: int, batch_tokens: list[int], step_of_folder: int | None,
                           total_tokens: int) -> None:
    """The trainer state of a checkpoint against its schema and the run: step, tokens and data
    cursors consistent with each other and the batch size. One AnnealError naming the file."""
    where = Path(path) / f"{STATE}.json"

    def bad(what: str) -> AnnealError:
        return AnnealError(f"{where}: {what}; the checkpoint is damaged or not this run's. Move the step folder "
                           "aside and resume (the newest other complete checkpoint is used)")

    if not isinstance(state, dict):
        raise bad("not a mapping")
    for key, kind in (("step", int), ("tokens", int), ("history", list), ("rng", dict), ("data", list)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise bad(f"field {key!r} is missing or not a {getattr(kind, '__name__', 'list')}")
    step, tokens = state["step"], state["tokens"]
    if step < 1 or tokens < 1:
        raise bad(f"step {step} and tokens {tokens} must be positive (a checkpoint is written after a step)")
    if step_of_folder is not None and step != step_of_folder:
        raise bad(f"step {step} but the folder is {step_dir_name(step_of_folder)}")
    per_step = [b // seq_len * seq_len for b in batch_tokens]
    if tokens % seq_len or not step * min(per_step) <= tokens <= step * max(per_step):
        raise bad(f"{tokens} tokens in {step} steps do not fit batches of {sorted(set(per_step))} tokens "
                  f"(data.seq_len={seq_len})")
    if tokens > total_tokens + max(per_step):
        raise bad(f"{tokens} tokens is past the end of the schedule ({total_tokens} tokens)")
    for row in state["history"]:
        if isinstance(row, dict) and (row.get("step", 0) > step or row.get("tokens", 0) > tokens):
            raise bad(f"its history has a row of step {row.get('step')} past the state's step {step}")
    sequences = 0
    for sd in state["data"]:
        if not isinstance(sd, dict):
            raise bad("a data cursor is not a mapping")
        seqs = sd.get("sequences", 0)
        numbers = [seqs, *(x for c in sd.get("cursors", []) for x in (c if isinstance(c, list) else [c]))]
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**53 for x in numbers):
            raise bad("a data cursor is not a non-negative integer")
        sequences += seqs
        # every document holds at least one token: a shard cannot have passed more documents than
        # the tokens it has read (its sequences, plus one in the packing buffer)
        read = (seqs + 2) * (seq_len + 1)
        for c, n in zip(sd.get("cursors", []), sd.get("n_train") or []):
            if isinstance(c, list) and len(c) == 2 and isinstance(n, int) and (c[1] > n or c[0] * n + c[1] > read):
                raise bad(f"a data cursor (epoch {c[0]}, document {c[1]} of {n}) is past what {seqs} sequences "
                          "can have read")
    if sequences and sequences * seq_len < tokens:
        raise bad(f"the data cursors account for {sequences} sequences, fewer than the {tokens // seq_len} "
                  "trained")
    if not math.isfinite(float(tokens)):
        raise bad("tokens is not finite")
