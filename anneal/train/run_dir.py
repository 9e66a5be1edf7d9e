"""The run folder: claimed once, never written over by accident."""
from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from anneal.checkpoints import training_state
from anneal.errors import AnnealError

RUN_MARKER = "config.yaml"  # a folder holding this file holds a run
RUN_FILES = ("ckpt", "tokenizer", "metrics.jsonl", "wandb", "wandb_id", "hf", RUN_MARKER)


def claim_run_dir(cfg: DictConfig, run_dir: Path) -> Path | None:
    """Refuse to write over an existing run unless asked (run.resume / run.overwrite); write the
    config marker; return the checkpoint to resume from (None: start from step 0)."""
    marker = run_dir / RUN_MARKER
    if marker.exists() and not cfg.run.resume:
        if not cfg.run.overwrite:
            raise AnnealError(
                f"run folder {run_dir} already holds a run. Pass run.resume=true to continue it, "
                "run.overwrite=true to start it over, or another run.name")
        for name in RUN_FILES:
            p = run_dir / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = resume_point(cfg, run_dir)
    if not marker.exists():
        marker.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return resume_from


def resume_point(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint a run.resume=true run continues from (what ranks other than 0 read)."""
    return training_state.latest_checkpoint(run_dir / "ckpt") if cfg.run.resume else None


def resume_command(cfg: DictConfig, run_dir: Path, *extra: str) -> str:
    """The command that continues this run: the overrides it was started with (under Hydra), the
    run folder spelled out, run.resume=true, and `extra`."""
    hydra = _hydra_job()
    overrides: list[str] = list(hydra.overrides.task) if hydra is not None else []
    replaced = {"run.name", "run.root", "run.dir", "run.resume", "run.overwrite",
                *(e.split("=", 1)[0] for e in extra)}
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in replaced]
    run_dir = Path(run_dir)
    where = [f"run.root={run_dir.parent}", f"run.name={run_dir.name}"]
    return " ".join(["anneal", *map(shlex.quote, kept), *map(shlex.quote, where), "run.resume=true",
                     *map(shlex.quote, extra)])


def wandb_group(cfg: DictConfig, run_dir: Path) -> str | None:
    """logging.group, or under `anneal --multirun` the sweep's folder name: every branch of a sweep
    lands in one W&B group, so its per-source eval curves sit side by side."""
    if cfg.logging.group:
        return cfg.logging.group
    from hydra.types import RunMode

    hydra = _hydra_job()
    return Path(run_dir).parent.name if hydra is not None and hydra.mode == RunMode.MULTIRUN else None


def _hydra_job():
    """Hydra's config of the running `anneal` job; None when train() is called without Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None
