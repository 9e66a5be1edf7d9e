"""Console commands on checkpoints and exports.

- `anneal-export CKPT OUT`: a resumable checkpoint folder -> an HF folder transformers loads.
- `anneal-catalog [--refresh]`: list the checkpoint catalog (refreshed from the hub's refs).
- `anneal-soup A B [C ...] --out SOUP [--weights ...]`: the weighted mean of HF exports (a "soup").
- `anneal-compare RUN_OR_SWEEP ... [--eval EXPORT ...]`: final and per-source held-out eval loss of
  runs, and of exports evaluated on the same held-out documents.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from anneal.cli import USER_ERRORS, report_error


def export_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anneal-export",
                                     description="Export a training checkpoint (runs/<id>/ckpt/step_00000008, or a run folder) as an HF folder.")
    parser.add_argument("checkpoint", help="a step folder, or a run folder (its latest checkpoint)")
    parser.add_argument("out", help="HF folder to create")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        from anneal.checkpoints.export import export_training_checkpoint

        out = export_training_checkpoint(Path(args.checkpoint), Path(args.out), dtype=args.dtype,
                                         max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except USER_ERRORS as e:
        report_error(e)
        sys.exit(2)
    from anneal.train.devices import peak_host_memory_gb

    Console().print(f"wrote {out}")
    Console().print(f"peak host memory {peak_host_memory_gb():.2f} GB")


def catalog_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anneal-catalog", description="List the checkpoint catalog.")
    parser.add_argument("--catalog", action="append", default=[], help="extra catalog YAML (repeatable)")
    parser.add_argument("--refresh", action="store_true",
                        help="list the hub repo's branches and tags (the intermediate dots.llm1 checkpoints) and "
                             "write them into the user catalog, which `anneal` reads by default")
    parser.add_argument("--repo", default=None, help="with --refresh: the hub repo (default rednote-hilab/dots.llm1.base)")
    parser.add_argument("--out", default=None,
                        help="with --refresh: the catalog file to write (default $XDG_CONFIG_HOME/anneal/catalog.yaml, "
                             "i.e. ~/.config/anneal/catalog.yaml; another file is read with catalog_files=[FILE])")
    args = parser.parse_args(argv)
    try:
        from anneal.checkpoints.catalog import DOTS1_BASE_REPO, Catalog, format_catalog_table
        from anneal.checkpoints.catalog_refresh import refresh_catalog

        if args.refresh:
            path, found = refresh_catalog(args.repo or DOTS1_BASE_REPO, args.out)
            Console().print(f"{len(found)} refs of {args.repo or DOTS1_BASE_REPO} written to {path}: "
                            f"{', '.join(e['name'] for e in found) or '(none besides main)'}", soft_wrap=True)
            args.catalog.append(str(path))
        catalog = Catalog.load(args.catalog)
        console = Console()
        console.print(format_catalog_table(catalog))
        for row in catalog.rows():   # the locations a user copies: whole lines, never wrapped
            console.print(f"{row['name']}: {row['location']}", soft_wrap=True, highlight=False, markup=False)
    except USER_ERRORS as e:
        report_error(e)
        sys.exit(2)


def soup_main(argv: list[str] | None = None) -> None:
    """`anneal-soup A B [C ...] --out SOUP [--weights wA wB ...]`: the weighted mean of HF exports."""
    parser = argparse.ArgumentParser(
        prog="anneal-soup",
        description="Average two or more HF exports of one base checkpoint, weight by weight (streamed, fp32), "
                    "into a new HF folder (anneal.checkpoints.soup says why the router bias is averaged too).")
    parser.add_argument("ingredients", nargs="+", help="HF export folders (e.g. runs/sweep/0/hf)")
    parser.add_argument("--out", required=True, help="the soup's HF folder (must not exist)")
    parser.add_argument("--weights", nargs="+", type=float, default=None,
                        help="one weight per ingredient, normalized to sum 1 (default: uniform)")
    parser.add_argument("--allow-different-bases", action="store_true",
                        help="soup exports whose anneal_meta.json started_from differ")
    parser.add_argument("--max-shard-size", default="2GB")
    args = parser.parse_args(argv)
    try:
        from anneal.checkpoints.soup import make_soup
        from anneal.train.devices import peak_host_memory_gb

        result = make_soup(args.ingredients, args.out, args.weights, allow_different_bases=args.allow_different_bases,
                           max_shard_size=args.max_shard_size, peak_memory_gb=peak_host_memory_gb)
    except USER_ERRORS as e:
        report_error(e)
        sys.exit(2)
    console = Console()
    for path, w in zip(args.ingredients, result.weights):
        console.print(f"{w:8.4f}  {path}")
    console.print(f"averaged {result.tensors} tensors into {result.shards} shard(s); peak host memory "
                  f"{result.peak_host_gb:.2f} GB ({result.peak_host_before_gb:.2f} GB before the first tensor)")
    console.print(f"wrote {result.folder}")


def compare_main(argv: list[str] | None = None) -> None:
    """`anneal-compare RUN_OR_SWEEP ... [--eval EXPORT ...] [--out table.png]`: final and per-source
    held-out eval loss of every run, and of exports scored on the same held-out documents."""
    parser = argparse.ArgumentParser(prog="anneal-compare", description=compare_main.__doc__)
    parser.add_argument("runs", nargs="+", help="run folders (runs/<name>) or sweep folders (their runs)")
    parser.add_argument("--eval", nargs="+", default=[], metavar="EXPORT",
                        help="HF folders (soups, runs/<name>/hf) to score on the first run's held-out set")
    parser.add_argument("--out", default="compare.png", help="PNG path to write")
    parser.add_argument("--device", default="cpu", help="where --eval runs the models (cpu, cuda)")
    args = parser.parse_args(argv)
    try:
        from anneal.compare import compare, comparison_table, plot_rows

        rows = compare(args.runs, args.eval, device=args.device)
    except USER_ERRORS as e:
        report_error(e)
        sys.exit(2)
    # a terminal folds the table to its width; a log file gets it whole, one row per line
    console = Console() if sys.stdout.isatty() else Console(width=1000)
    console.print(comparison_table(rows))
    console.print(f"wrote {plot_rows(rows, args.out)}", soft_wrap=True, highlight=False)
