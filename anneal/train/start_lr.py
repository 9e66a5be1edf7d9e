"""The LR an anneal starts at, decided in one place for the trainer and `anneal-plot-schedule`.

`schedule.start_lr` when set; else the checkpoint's own LR: its catalog entry's `lr`, else the
`lr` in the checkpoint folder's anneal_meta.json (every export writes one); else a clear
AnnealError (no guessed default).
"""
from __future__ import annotations

from anneal.errors import AnnealError


def resolve_start_lr(cfg, entry_lr: float | None, folder_meta: dict) -> float:
    """The anneal starts at the checkpoint's LR: schedule.start_lr, else the catalog entry's lr,
    else the lr recorded in the checkpoint folder's anneal_meta.json."""
    if cfg.schedule.start_lr is not None:
        return float(cfg.schedule.start_lr)
    if entry_lr is not None:
        return float(entry_lr)
    if "lr" in folder_meta:
        return float(folder_meta["lr"])
    raise AnnealError(
        f"schedule.start_lr is null and checkpoint {cfg.checkpoint!r} records no LR (no catalog entry "
        "with `lr`, no anneal_meta.json). Set schedule.start_lr=<the LR the checkpoint was trained at>, "
        "e.g. schedule.start_lr=3e-4 for a dots1 stable-phase checkpoint.")


def start_lr_without_loading(cfg) -> float:
    """:func:`resolve_start_lr` for tools that do not load the checkpoint: the catalog entry and,
    for a checkpoint folder already on this machine (local, or in the HF cache), its
    anneal_meta.json. Nothing is downloaded."""
    if cfg.schedule.start_lr is not None or cfg.checkpoint is None:
        return resolve_start_lr(cfg, None, {})
    from anneal.checkpoints.catalog import Catalog
    from anneal.checkpoints.run_checkpoints import export_meta

    catalog = Catalog.load(list(cfg.catalog_files))
    try:
        resolved = catalog.resolve(cfg.checkpoint, offline=True)
    except AnnealError:  # not on this machine (or not a checkpoint at all): the catalog entry only
        entry = catalog.entries.get(cfg.checkpoint)
        return resolve_start_lr(cfg, entry.lr if entry is not None else None, {})
    return resolve_start_lr(cfg, resolved.entry.lr if resolved.entry is not None else None,
                            export_meta(resolved.path))
