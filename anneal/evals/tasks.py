"""Benchmark task files: a small YAML per task (what the items are and how a prompt is built),
its items read through `datasets` (JSONL / JSON / CSV / parquet), checked once at start-up.

    name: gsm8k
    kind: generative              # multiple_choice | generative
    data: {test: gsm8k_test.jsonl, fewshot: gsm8k_shots.jsonl}   # split -> file(s), relative to the YAML
    split: test                   # the scored items
    fewshot_split: fewshot        # where the k shots come from (default: `split`; then they are not scored)
    shots: 5
    fields: [question, answer]    # every item must have these (a missing or null one is an error)
    skip_incomplete_items: false  # true: skip the items missing a field instead (a source with known gaps)
    template: "Question: {question}\\nAnswer:"
    target: "{answer}"            # generative: the gold continuation
    # multiple_choice instead: choices: [negative, positive] (or the name of a list field), answer: label
    target_delimiter: " "         # between the prompt and a continuation (lm-evaluation-harness's default)
    fewshot_delimiter: "\\n\\n"     # between the shots and the question
    limit: 200                    # score a seeded sample of this many items (default: all)
    overlap_fields: [question]    # fields checked against the training mixture (default: the template's)
    harness: {...}                # extra lm-evaluation-harness task keys for `anneal-eval` (generation)

A prompt is built exactly as lm-evaluation-harness builds it (`fewshot_delimiter.join(shot +
target_delimiter + gold) + fewshot_delimiter + template(item)`), so the in-loop scores and the
harness's on the same items agree.
"""
from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from anneal.errors import AnnealError

KINDS = ("multiple_choice", "generative")
_KEYS = {"name", "kind", "data", "split", "fewshot_split", "shots", "fields", "template", "target", "choices",
         "answer", "target_delimiter", "fewshot_delimiter", "limit", "seed", "overlap_fields", "harness",
         "description", "skip_incomplete_items"}
_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def bundled_tasks() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("anneal.evals").joinpath("tasks").iterdir()
                  if p.name.endswith(".yaml"))


def template_fields(template: str) -> list[str]:
    """The field names a `{field}` template refers to."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


@dataclass
class Task:
    """One task's spec and its loaded items (`items` scored, `shots` the k-shot exemplars)."""
    name: str
    kind: str
    path: Path
    template: str
    fields: list[str]
    shots_n: int
    items: list[dict]
    shots: list[dict]
    target: str | None = None
    choices: list[str] | str | None = None
    answer: str | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    overlap_fields: list[str] = field(default_factory=list)
    harness: dict = field(default_factory=dict)
    description: str = ""

    # -- prompts (lm-evaluation-harness's construction) ----------------------------------------
    def choices_of(self, item: dict) -> list[str]:
        return [str(c) for c in (item[self.choices] if isinstance(self.choices, str) else self.choices)]

    def gold_index(self, item: dict) -> int:
        value, choices = item[self.answer], self.choices_of(item)
        if isinstance(value, str) and not value.lstrip("-").isdigit():
            return choices.index(value)
        return int(value)

    def gold_text(self, item: dict) -> str:
        if self.kind == "multiple_choice":
            return self.choices_of(item)[self.gold_index(item)]
        return self.target.format_map(item)

    def context(self, item: dict) -> str:
        """The k-shot prompt for `item`."""
        shots = "".join(self.template.format_map(s) + self.target_delimiter + self.gold_text(s)
                        + self.fewshot_delimiter for s in self.shots)
        return self.description + shots + self.template.format_map(item)

    def continuations(self, item: dict) -> list[str]:
        """What is scored after the context: every choice (MC) or the gold answer (generative)."""
        if self.kind == "multiple_choice":
            return [self.target_delimiter + c for c in self.choices_of(item)]
        return [self.target_delimiter + self.gold_text(item)]


def task_path(name: str) -> Path:
    """A bundled task name or a task YAML path."""
    p = Path(os.path.expanduser(name))
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise AnnealError(f"eval task {name}: no such file")
        return p
    bundled = resources.files("anneal.evals").joinpath("tasks", f"{name}.yaml")
    if not bundled.is_file():
        raise AnnealError(f"eval task {name!r}: not a bundled task ({', '.join(bundled_tasks())}) "
                          f"nor a .yaml file")
    return Path(str(bundled))


def load_task(name: str, limit: int | None = None, shots: int | None = None) -> Task:
    """Read and check a task: one AnnealError naming the task and the field for bad input."""
    path = task_path(name)
    raw = yaml.safe_load(path.read_text()) or {}
    tname = raw.get("name", path.stem)
    where = f"eval task {tname} ({path})"

    def bad(key: str, what: str) -> AnnealError:
        return AnnealError(f"{where}: {key}: {what}")

    if not isinstance(raw, dict):
        raise AnnealError(f"{where}: must be a mapping of the task keys")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise bad(unknown[0], f"unknown key; a task has: {', '.join(sorted(_KEYS))}")
    for key in ("kind", "data", "split", "fields", "template"):
        if key not in raw:
            raise bad(key, "missing")
    kind = raw["kind"]
    if kind not in KINDS:
        raise bad("kind", f"{kind!r} must be one of {', '.join(KINDS)}")
    fields = list(raw["fields"])
    template = str(raw["template"])
    for f in template_fields(template):
        if f not in fields:
            raise bad("template", f"refers to {{{f}}} but `fields` has only {', '.join(fields)}")
    target, choices, answer = raw.get("target"), raw.get("choices"), raw.get("answer")
    if kind == "generative":
        if target is None:
            raise bad("target", "missing (the gold answer template of a generative task, e.g. \"{answer}\")")
        for f in template_fields(str(target)):
            if f not in fields:
                raise bad("target", f"refers to {{{f}}} but `fields` has only {', '.join(fields)}")
    else:
        if choices is None:
            raise bad("choices", "missing (a list of choice texts, or the name of a field holding the list)")
        if answer is None:
            raise bad("answer", "missing (the field holding the gold choice: its index or its text)")
        for key, f in (("answer", answer), ("choices", choices if isinstance(choices, str) else None)):
            if f is not None and f not in fields:
                raise bad(key, f"field {f!r} is not in `fields` ({', '.join(fields)})")
    n_shots = int(raw.get("shots", 0) if shots is None else shots)
    if n_shots < 0:
        raise bad("shots", f"{n_shots} must be >= 0")
    split, fewshot_split = raw["split"], raw.get("fewshot_split", raw["split"])
    splits, files = _read_splits(raw["data"], path, bad)
    for key, s in (("split", split), ("fewshot_split", fewshot_split)):
        if s not in splits:
            raise bad(key, f"{s!r} is not a split of `data` ({', '.join(splits)})")
    skip_incomplete = bool(raw.get("skip_incomplete_items", False))
    for s, rows in splits.items():
        for f in fields:
            if rows and f not in rows[0]:
                raise bad("fields", f"split {s!r} has no field {f!r} (it has: {', '.join(rows[0])})")
        complete = [r for r in rows if all(r[f] is not None for f in fields)]
        if len(complete) < len(rows) and not skip_incomplete:
            i, f = next((i, f) for i, r in enumerate(rows) for f in fields if r[f] is None)
            raise bad("fields", f"item {i} of split {s!r} ({', '.join(files[s])}) has no {f!r} (missing or null); "
                      "fill it in or remove the item, or set `skip_incomplete_items: true` to skip such items")
        splits[s] = complete
    pool = splits[fewshot_split]
    if n_shots > len(pool) - (1 if fewshot_split == split else 0):
        raise bad("shots", f"{n_shots} shots but split {fewshot_split!r} has {len(pool)} items"
                  + (" (and shares them with the scored items)" if fewshot_split == split else ""))
    shot_items = pool[:n_shots]
    items = splits[split][n_shots:] if fewshot_split == split else splits[split]
    limit = raw.get("limit") if limit is None else limit
    if limit is not None and limit < len(items):
        pick = np.sort(np.random.default_rng(int(raw.get("seed", 0))).permutation(len(items))[:int(limit)])
        items = [items[i] for i in pick]
    if not items:
        raise bad("split", f"{split!r} has no items to score")
    task = Task(name=str(tname), kind=kind, path=path, template=template, fields=fields, shots_n=n_shots,
                items=items, shots=shot_items, target=target, choices=choices, answer=answer,
                target_delimiter=str(raw.get("target_delimiter", " ")),
                fewshot_delimiter=str(raw.get("fewshot_delimiter", "\n\n")),
                overlap_fields=list(raw.get("overlap_fields") or template_fields(template)),
                harness=dict(raw.get("harness") or {}), description=str(raw.get("description", "")))
    for f in task.overlap_fields:
        if f not in fields:
            raise bad("overlap_fields", f"field {f!r} is not in `fields`")
    if kind == "multiple_choice":
        for i, item in enumerate(task.items + task.shots):
            try:
                gold = task.gold_index(item)
                ok = 0 <= gold < len(task.choices_of(item))
            except (ValueError, TypeError):
                ok = False
            if not ok:
                raise bad("answer", f"item {i}: {answer}={item[answer]!r} is neither a choice index nor a "
                          f"choice text of {task.choices_of(item)}")
    return task


def _read_splits(data, path: Path, bad) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
    """(split -> rows (dicts), split -> its files), each split's files read through `datasets`."""
    if isinstance(data, str):
        data = {"test": data}
    if not isinstance(data, dict) or not data:
        raise bad("data", "must map split names to files, e.g. {test: items.jsonl}")
    from mixtures._files import quiet_datasets

    out, read_from = {}, {}
    for split, files in data.items():
        files = [files] if isinstance(files, str) else list(files)
        resolved = []
        for f in files:
            expanded = os.path.expandvars(os.path.expanduser(str(f)))
            if "$" in expanded:
                raise bad(f"data.{split}", f"{f}: environment variable not set; point it at the data file")
            p = Path(expanded) if Path(expanded).is_absolute() else path.parent / expanded
            if not p.is_file():
                raise bad(f"data.{split}", f"{p}: no such file")
            if p.suffix not in _LOADERS:
                raise bad(f"data.{split}", f"{p}: use one of {', '.join(_LOADERS)}")
            resolved.append(p)
        loaders = {_LOADERS[p.suffix] for p in resolved}
        if len(loaders) > 1:
            raise bad(f"data.{split}", "mixes file formats; use one format per split")
        with quiet_datasets() as datasets:
            try:
                ds = datasets.load_dataset(loaders.pop(), data_files=[str(p) for p in resolved], split="train")
            except Exception as e:  # noqa: BLE001 - re-raised with the task and field
                raise bad(f"data.{split}", f"could not read {', '.join(map(str, resolved))}: {e}") from e
        out[str(split)] = ds.to_list()
        read_from[str(split)] = [str(p) for p in resolved]
    return out, read_from
