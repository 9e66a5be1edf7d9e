"""anneal-compare: the held-out eval losses of runs (branches of a sweep) side by side, and of HF
exports (soups, the branches' own exports) scored on the same held-out documents.

A run folder holds `config.yaml` (the resolved config) and `metrics.jsonl`; its row is the last
eval row there (`eval_loss`, `eval_loss/<source>`). A sweep folder is a folder whose subfolders
are runs (what `anneal --multirun` writes). An export has no metrics, so `--eval` recreates the
held-out batches from the first run's config and tokenizer (the mixture's held-out documents do
not depend on the training seed) and scores the export with the trainer's own eval function
(`anneal.train.callbacks.heldout_losses`), loaded through the project's loader.

Benchmark columns (`anneal.evals`): a run's last in-loop scores (`bench/<task>/<metric>` in
metrics.jsonl) and its newest `anneal-eval` scores (evals.jsonl, `harness:<task>/<metric>`); an
export or soup is scored on the items of the first run's `eval.tasks`, the items its runs were
scored on, and its harness columns come from its run's evals.jsonl and its own folder's (where
`anneal-eval` writes for an export of no run). Higher is better in every benchmark column.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from anneal.errors import AnnealError
from anneal.train.run_dir import RUN_MARKER

# config keys that name where a run lives, not what it trained
_NOT_A_DIFFERENCE = ("run.", "export.dir", "logging.")
# what fixes a run's held-out batches
_HELDOUT_KEYS = ("data.mixture", "data.seq_len", "data.eval_seqs")


@dataclass
class Row:
    name: str
    kind: str                       # run | export | soup
    tokens: int | None              # tokens trained at the eval (runs)
    eval_loss: float | None
    per_source: dict[str, float] = field(default_factory=dict)
    differs: str = ""               # the config values that set this run apart from the others
    bench: dict[str, float] = field(default_factory=dict)  # benchmark scores (anneal.evals), higher is better


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def find_runs(paths: list[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(label, run folder) for each run folder given and each run inside each sweep folder given."""
    out = []
    for p in map(Path, paths):
        if (p / RUN_MARKER).is_file():
            out.append((p.name, p))
            continue
        children = sorted((d for d in p.iterdir() if (d / RUN_MARKER).is_file()),
                          key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name)) \
            if p.is_dir() else []
        if not children:
            raise AnnealError(f"{p}: neither a run folder (no {RUN_MARKER}) nor a sweep folder (no subfolder "
                              f"holding a {RUN_MARKER}); pass runs/<name> or the folder of an --multirun")
        out += [(f"{p.name}/{d.name}", d) for d in children]
    return out


def load_config(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_dir / RUN_MARKER), resolve=False)


def run_row(label: str, run_dir: Path) -> Row:
    """The run's last eval row from its metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise AnnealError(f"{path}: missing; the run has not logged any metrics yet")
    evals = [r for r in map(json.loads, path.read_text().splitlines()) if "eval_loss" in r]
    if not evals:
        raise AnnealError(f"{path}: no eval row (eval_loss) yet")
    last = evals[-1]
    per_source = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("eval_loss/")}
    return Row(label, "run", last.get("tokens"), last["eval_loss"], per_source,
               bench={**bench_scores(last), **harness_scores(run_dir)})


# ------------------------------------------------------------------------ benchmark columns
# the in-loop scores shown per task (anneal.evals.scoring); all are higher-is-better
BENCH_METRICS = ("acc", "acc_norm", "logprob_per_byte")


def bench_scores(row: dict) -> dict[str, float]:
    """`<task>/<metric>` of a metrics row's `bench/<task>/<metric>` keys (BENCH_METRICS only)."""
    return {k[len("bench/"):]: v for k, v in row.items()
            if k.startswith("bench/") and k.rsplit("/", 1)[1] in BENCH_METRICS}


def harness_scores(folder: Path | None) -> dict[str, float]:
    """`harness:<task>/<metric>` of the newest anneal-eval row per task in `folder`'s evals.jsonl (a
    run's, or an export's or soup's own)."""
    path = Path(folder) / "evals.jsonl" if folder is not None else None
    if path is None or not path.is_file():
        return {}
    out = {}
    for row in map(json.loads, path.read_text().splitlines()):
        out.update({f"harness:{row['task']}/{k}": v for k, v in row.get("metrics", {}).items()
                    if isinstance(v, (int, float)) and "stderr" not in k})
    return out


def bench_of(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r.bench))


def score_benchmarks(model, cfg: dict, tokenizer, device: str) -> dict[str, float]:
    """An export's benchmark scores on the items of the run config's `eval.tasks` (the items its
    runs were scored on in the loop)."""
    import torch

    from anneal.evals.scoring import score_tasks
    from anneal.evals.tasks import load_task

    task_cfgs = (cfg.get("eval") or {}).get("tasks") or []
    if not task_cfgs:
        return {}
    tasks = [load_task(t["task"], limit=t.get("limit"), shots=t.get("shots")) for t in task_cfgs]
    model.eval()
    return bench_scores(score_tasks(model, tasks, tokenizer, torch.device(device)))


def differences(configs: dict[str, dict]) -> dict[str, str]:
    """label -> 'key=value ...' for the config keys whose values differ between the runs."""
    flat = {label: _flat({k: v for k, v in c.items() if k != "resumes"}) for label, c in configs.items()}
    keys = sorted({k for f in flat.values() for k in f if not k.startswith(_NOT_A_DIFFERENCE)})
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat.values()}) > 1]
    out = {label: [f"{k}={f.get(k)}" for k in differ] for label, f in flat.items()}
    for label, c in configs.items():  # settings changed when the run was resumed (anneal.train.resume)
        out[label] += [f"resumed at step {r['step']}: " + ", ".join(f"{ch['key']} {ch['from']}->{ch['to']}"
                                                                      for ch in r.get("changed", []))
                       for r in c.get("resumes") or []]
    return {label: " ".join(parts) for label, parts in out.items()}


class HeldOut:
    """A run's held-out batches, rebuilt from its resolved config and its tokenizer."""

    def __init__(self, run_dir: Path, cfg: dict):
        from transformers import AutoTokenizer

        from mixtures import PackedMixtureStream, load_mixture

        data = cfg["data"]
        self.run_dir, self.eval_seqs, self.seq_len = run_dir, data["eval_seqs"], data["seq_len"]
        self.cfg = cfg
        # exports are scored with the run's attention (a document mask changes every loss)
        self.document_mask = bool(cfg.get("model", {}).get("document_mask", False))
        self.tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
        self.spec = load_mixture(data["mixture"])
        self.stream = PackedMixtureStream(self.spec, self.tokenizer, seq_len=self.seq_len, seed=cfg["seed"])

    def score(self, export: Path, device: str) -> Row:
        import torch

        from anneal.checkpoints.hf_load import load_hf_checkpoint
        from anneal.train.callbacks import heldout_losses

        model, mcfg = load_hf_checkpoint(export, dtype=torch.float32, device=device)
        model.document_mask = self.document_mask
        if len(self.tokenizer) > mcfg.vocab_size:
            raise AnnealError(f"{export}: vocab_size {mcfg.vocab_size} is smaller than the tokenizer of "
                              f"{self.run_dir} ({len(self.tokenizer)} tokens); it is not a model of these runs")
        losses = heldout_losses(model, self.stream, self.spec.source_names, self.eval_seqs, self.seq_len,
                                torch.device(device))
        from anneal.checkpoints.run_checkpoints import export_meta

        kind = "soup" if "soup" in export_meta(export) else "export"
        name = "/".join(export.absolute().parts[-3:]) if export.name == "hf" else export.name  # sweep/0/hf
        per_source = {k.split("/", 1)[1]: v for k, v in losses.items() if k.startswith("eval_loss/")}
        bench = {**score_benchmarks(model, self.cfg, self.tokenizer, device),
                 **harness_scores(export.parent if (export.parent / RUN_MARKER).is_file() else None),
                 **harness_scores(export)}
        return Row(name, kind, None, losses.get("eval_loss"), per_source, bench=bench)


def compare(paths: list[str | os.PathLike], evals: list[str | os.PathLike] = (), device: str = "cpu") -> list[Row]:
    """One row per run (in the order given, sweeps expanded) and per export in `evals`."""
    runs = find_runs(paths)
    configs = {label: load_config(d) for label, d in runs}
    rows = [run_row(label, d) for label, d in runs]
    for row, diff in zip(rows, differences(configs).values()):
        row.differs = diff
    if evals:
        first_label, first = runs[0]
        ref = _flat(configs[first_label])
        for label, c in configs.items():
            other = _flat(c)
            for key in _HELDOUT_KEYS:
                if other.get(key) != ref.get(key):
                    raise AnnealError(f"--eval: run {label} has {key}={other.get(key)} but {first_label} has "
                                      f"{ref.get(key)}; their held-out sets differ, so compare such runs separately")
            if other.get("eval.tasks") != ref.get("eval.tasks"):
                raise AnnealError(f"--eval: run {label} has eval.tasks={other.get('eval.tasks')} but {first_label} has "
                                  f"{ref.get('eval.tasks')}; exports are scored on one set of benchmark items, so "
                                  "compare such runs separately")
            if bool(other.get("model.document_mask")) != bool(ref.get("model.document_mask")):
                raise AnnealError(f"--eval: run {label} has model.document_mask={bool(other.get('model.document_mask'))} "
                                  f"but {first_label} has {bool(ref.get('model.document_mask'))}; exports are scored "
                                  "with one attention, so compare such runs separately")
        for e in map(Path, evals):
            if not e.is_dir():
                raise AnnealError(f"--eval {e}: not a folder; pass HF export folders (e.g. a soup, runs/<name>/hf)")
        heldout = HeldOut(first, configs[first_label])
        rows += [heldout.score(Path(e), device) for e in evals]
    return rows


def sources_of(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(s for r in rows for s in r.per_source))


def comparison_table(rows: list[Row]):
    """A rich Table: one row per run/export, the best value of each column in bold (the lowest
    loss, the highest benchmark score)."""
    from rich.markup import escape
    from rich.table import Table

    from anneal.train.schedule import format_tokens

    sources = sources_of(rows)
    bench = bench_of(rows)
    table = Table(title="held-out eval loss (final)")
    for col in ("name", "kind", "tokens", "eval_loss", *sources, *bench, "differs"):
        # names and numbers are never broken (a name is copied whole); headers and differs fold (at
        # spaces, else mid-word) rather than being cut with an ellipsis
        table.add_column(col, justify="left" if col in ("name", "kind", "differs") else "right",
                         overflow="fold", no_wrap=col != "differs", ratio=2 if col == "differs" else None)

    def cell(v, best):
        if v is None:
            return "-"
        return f"[bold]{v:.4f}[/]" if v == best else f"{v:.4f}"

    best_mean = min((r.eval_loss for r in rows if r.eval_loss is not None), default=None)
    best = {s: min((r.per_source[s] for r in rows if s in r.per_source), default=None) for s in sources}
    best_bench = {b: max((r.bench[b] for r in rows if b in r.bench), default=None) for b in bench}
    for r in rows:
        table.add_row(escape(r.name), r.kind, format_tokens(r.tokens) if r.tokens is not None else "-",
                      cell(r.eval_loss, best_mean), *(cell(r.per_source.get(s), best[s]) for s in sources),
                      *(cell(r.bench.get(b), best_bench[b]) for b in bench), escape(r.differs))
    return table


def plot_rows(rows: list[Row], path: str | os.PathLike) -> Path:
    from anneal.train.plots import plot_comparison

    sources = sources_of(rows)
    columns = {"eval_loss": [r.eval_loss for r in rows],
               **{s: [r.per_source.get(s) for r in rows] for s in sources}}
    scores = {b: [r.bench.get(b) for r in rows] for b in bench_of(rows)}
    return plot_comparison([r.name for r in rows], columns, path, scores=scores)
