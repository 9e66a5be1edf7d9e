"""Console entry points (the commands on checkpoints and exports are in `anneal.checkpoint_cli`).

- `anneal [overrides...]`: the Hydra app that runs an anneal (the embedded default with no args).
- `anneal-plot-schedule [overrides...]`: PNG of LR and batch size against tokens for a recipe.
- `anneal-plan [overrides...]`: per-source documents, tokens, shares and epochs a recipe implies.
- `anneal-plan mixture FILE --stage-tokens stage1=20B stage2=5B [--seq-len N] [--tokenizer DIR|train]`:
  the same for a mixture file alone, with the stages' token budgets and the tokenizer given by hand.

`recipe=NAME` picks a bundled recipe from recipes/; `recipe=path/to/file.yaml` uses your own file
(registered in Hydra's ConfigStore as an option of the `recipe` group).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from anneal.errors import AnnealError
from anneal.paths import conf_dir
from anneal.train.preemption import PREEMPTED_EXIT_CODE
from anneal.train.resume import RECIPE_FILES, replay_saved_overrides
from mixtures.errors import MixtureError
from moe.errors import UnknownBackendError

USER_ERRORS = (AnnealError, MixtureError, UnknownBackendError)  # bad input: one clear message, no traceback

CONF_DIR = conf_dir()

err_console = Console(stderr=True)


def register_recipe_files(args: list[str]) -> list[str]:
    """`recipe=path/to/file.yaml` (or `recipe=a.yaml,b.yaml` under --multirun): each file goes into
    Hydra's ConfigStore as an option of the `recipe` group, at the global package (so its
    `# @package _global_` header is optional), and the argument becomes `recipe=<its name>`. No
    temporary folder, no search-path override: Hydra's own flags may come before or after it."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not (sep and key.lstrip("+") == "recipe" and (".yaml" in value or ".yml" in value or "/" in value)):
            out.append(arg)
            continue
        names = []
        for item in value.split(","):
            path = Path(item).expanduser()
            if not path.is_file():
                raise AnnealError(f"recipe={item}: no such file. Give a bundled recipe name "
                                  f"({', '.join(bundled_recipes())}) or a path to a recipe YAML")
            try:
                node = OmegaConf.load(path)
            except Exception as e:  # noqa: BLE001 - a YAML syntax error, with its line
                raise AnnealError(f"recipe {path}: not valid YAML ({' '.join(str(e).split())})") from None
            name = path.stem if path.stem not in bundled_recipes() else f"{path.stem}-file"
            ConfigStore.instance().store(group="recipe", name=name, node=node, package="_global_")
            RECIPE_FILES[name] = str(path.resolve())   # what the run's overrides record and errors name
            names.append(name)
        out.append(f"{key}={','.join(names)}")
    return out


def composition_error(e: Exception) -> AnnealError:
    """Hydra's composition error as one line; an unknown key gets the nearest valid one."""
    import re

    from anneal.config import check_keys

    text = str(e)
    where_m = re.search(r"In 'recipe/([^']+)'", text)
    where = f"recipe {RECIPE_FILES.get(where_m.group(1), where_m.group(1))}" if where_m else "command line"
    key_m = re.search(r"Could not override '([^']+)'", text) or re.search(r"full_key: (\S+)", text)
    if key_m and ("not in" in text or "Could not override" in text):
        try:
            check_keys([key_m.group(1)], where)
        except AnnealError as unknown:   # the key is not in the schema: the did-you-mean message
            return unknown
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing:
        group, name = missing.groups()
        hint = (f"; bundled: {', '.join(bundled_recipes())}, or a path to a recipe YAML" if group == "recipe" else
                f"; {group} has: {', '.join(sorted(p.stem for p in (CONF_DIR / group).glob('*.yaml')))}")
        return AnnealError(f"{group}={name}: no such {group} config{hint}")
    first = text.strip().splitlines()[0]
    cause = e.__cause__ and str(e.__cause__).strip().splitlines()[0]
    return AnnealError(f"{where}: {first}" + (f": {cause}" if cause and cause not in first else ""))


def bundled_recipes() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))


def _is_rank0() -> bool:
    """Launchers (deepspeed, torchrun) set RANK; only rank 0 talks to the user."""
    return int(os.environ.get("RANK", "0")) == 0


def report_error(e: Exception) -> None:
    if _is_rank0():  # the message as is: no rich markup read in it, no wrapping
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)


# ---------------------------------------------------------------------------------------------- anneal
def main() -> None:
    import hydra
    from hydra.errors import HydraException
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    from anneal.config import register_schema
    from anneal.train.devices import reset_peak_host_memory

    register_schema()
    try:
        sys.argv[1:], replayed = replay_saved_overrides(sys.argv[1:])
        if replayed and _is_rank0():
            Console(soft_wrap=True).print(replayed, markup=False, highlight=False)
        sys.argv[1:] = register_recipe_files(sys.argv[1:])
    except USER_ERRORS as e:
        report_error(e)
        sys.exit(2)
    reset_peak_host_memory()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _run(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from anneal.config import absolute_paths
        from anneal.train.loop import train
        from moe.experts import get_backend

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        reset_peak_host_memory()   # under --multirun each job is one call in this process
        run_dir = HydraConfig.get().runtime.output_dir
        try:
            # a bad backend name fails on every rank alike, before any collective: the loop's
            # layout.rank0_first broadcasts AnnealError only, and moe raises its own UnknownBackendError
            get_backend(cfg.model.experts_backend)
            absolute_paths(cfg)   # the saved config means the same from any folder
            result = train(cfg, run_dir)
        except USER_ERRORS as e:
            message = str(e)
            if "resume with run.resume=true" in message:  # say which run, as a command that works as printed
                message += f" (the command: {_resume_command_for(cfg, run_dir)})"
            report_error(AnnealError(message))
            sys.exit(getattr(e, "exit_code", 2))  # 2: bad input; 3: a guard stopped the run (README)
        except KeyboardInterrupt:
            report_error(AnnealError("interrupted (a second Ctrl-C): the run stopped mid-step; its newest complete "
                                      "checkpoint is kept; continue with: "
                                      + _resume_command_for(cfg, run_dir)))
            sys.exit(130)
        if _is_rank0():
            _print_summary(result)
        _close_process_group()
        if result.get("preempted"):
            sys.exit(PREEMPTED_EXIT_CODE)

    # Hydra's errors reach us (not its own printer), so a composition error is one line, with
    # the nearest valid key for an unknown one (Hydra's message has no suggestion)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        _run()
    except (HydraException, OmegaConfBaseException) as e:
        report_error(composition_error(e))
        sys.exit(2)


def _resume_command_for(cfg, run_dir) -> str:
    from anneal.train.run_dir import resume_command

    return resume_command(cfg, run_dir)


def _close_process_group() -> None:
    """After a finished run, tear the process group down here rather than in interpreter shutdown
    (torchtitan does the same at the end of training): once, in CI, a rank aborted at exit with
    'terminate called without an active exception' while its gloo group was left to teardown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _print_summary(result: dict) -> None:
    """The end of a run: losses, then the paths and commands a user copies, each whole on its
    own line (soft_wrap: rich never breaks them, at any terminal width or in a log file)."""
    from anneal.train.tracking import smoothed_losses

    console = Console(soft_wrap=True)
    evals = [r for r in result["history"] if "eval_loss" in r]
    smooth = smoothed_losses(result["history"])
    if smooth is not None:
        first, last, n = smooth
        console.print(f"train loss {first:.3f} -> {last:.3f} over {result['step']} steps "
                      f"(mean of the first and of the last {n} logged step{'s' if n > 1 else ''})")
    if len(evals) >= 2:
        console.print(f"eval loss  {evals[0]['eval_loss']:.3f} -> {evals[-1]['eval_loss']:.3f}")
    console.print(f"run folder : {result['run_dir']}", highlight=False)
    if result.get("wandb_dir"):
        group = f", group {result['wandb_group']}" if result.get("wandb_group") else ""
        console.print(f"W&B run    : {result['wandb_dir']}  (offline{group})", highlight=False)
        console.print(f"upload with: wandb sync {result['wandb_dir']}", highlight=False, markup=False)
    if result.get("export_dir"):
        console.print(f"HF export  : {result['export_dir']}", highlight=False)
    elif result.get("preempted"):
        console.print(f"preempted: a checkpoint of step {result['step']} was written (exit status {PREEMPTED_EXIT_CODE})")
    elif result.get("stopped_early"):
        console.print("stopped early (trainer.stop_after_steps); continue with:")
        console.print(result["resume_command"], markup=False, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------- compose
def compose(overrides: list[str]):
    """The same config `anneal` would run, composed without starting a run (for tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from anneal.config import register_schema

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schema()
    overrides = register_recipe_files(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name="config", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as e:
            raise composition_error(e) from None


def plot_schedule_main(argv: list[str] | None = None) -> None:
    """PNG of a recipe's LR and batch size against tokens. The start LR is the one the run would
    use (anneal.train.start_lr), read without downloading the checkpoint."""
    parser = argparse.ArgumentParser(prog="anneal-plot-schedule", description=plot_schedule_main.__doc__)
    parser.add_argument("--out", default="schedule.png", help="PNG path to write")
    parser.add_argument("overrides", nargs="*", help="recipe=... and key=value overrides, as for `anneal`")
    args = parser.parse_args(argv)
    try:
        from anneal.train.plots import plot_schedule
        from anneal.train.schedule import format_tokens
        from anneal.train.start_lr import start_lr_without_loading
        from anneal.train.build import build_schedule

        cfg = compose(args.overrides)
        schedule, ramp = build_schedule(cfg, start_lr_without_loading(cfg))
        path = plot_schedule(schedule, ramp, args.out, title=f"checkpoint={cfg.checkpoint}")
    except USER_ERRORS as e:
        report_error(e)
        sys.exit(2)
    for name in schedule.stage_names:
        st = schedule.stage(name)
        Console().print(f"{name:>8}: {format_tokens(schedule.stage_start(name))} -> "
                        f"{format_tokens(schedule.stage_end(name))} tokens, lr "
                        f"{schedule.stage_lr_start(name):.3g} -> {st.lr_end:.3g} ({st.shape})")
    Console().print(f"wrote {path}")


def plan_main(argv: list[str] | None = None) -> None:
    """`anneal-plan [overrides...]` plans a recipe; `anneal-plan mixture FILE --stage-tokens ...`
    plans a mixture file on its own (no recipe)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["mixture"]:
        return _plan_mixture_main(argv[1:])
    if argv[:1] == ["memory"]:
        return _plan_memory_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="anneal-plan",
        description="What a recipe's mixture and schedule imply per source, before any GPU time.",
        epilog="A mixture file without a recipe: anneal-plan mixture FILE --stage-tokens stage1=20B ... "
               "(see anneal-plan mixture --help). GPU memory per rank: anneal-plan memory [overrides] --gpus N.")
    parser.add_argument("overrides", nargs="*", help="recipe=... and key=value overrides, as for `anneal`")
    parser.add_argument("--repeat-warn", type=float, default=4.0, help="warn above this many epochs of a source")
    args = parser.parse_args(argv)
    try:
        from anneal.planning import print_plan

        print_plan(compose(args.overrides), repeat_warn=args.repeat_warn)
    except USER_ERRORS as e:
        report_error(e)
        sys.exit(2)


def _plan_mixture_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="anneal-plan mixture",
        description="Tokens, share and implied epochs of each source of a mixture file per stage "
                    "(epochs cumulative over the stages in the order given).")
    parser.add_argument("mixture", help="bundled mixture name or path to a mixture YAML")
    parser.add_argument("--stage-tokens", nargs="+", required=True, metavar="STAGE=N",
                        help="tokens per stage, e.g. stage1=20B stage2=5B (schedule order)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--tokenizer", default="train",
                        help='tokenizer folder / tokenizer.json, or "train" for the demo BPE')
    parser.add_argument("--vocab-size", type=int, default=4096, help="with --tokenizer train")
    parser.add_argument("--repeat-warn", type=float, default=4.0, help="warn above this many passes")
    parser.add_argument("--max-docs", type=int, default=20000,
                        help="count tokens on at most this many documents per source (estimate above)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    try:
        from anneal.planning import print_mixture_plan

        print_mixture_plan(args.mixture, args.stage_tokens, tokenizer=args.tokenizer, seq_len=args.seq_len,
                           vocab_size=args.vocab_size, repeat_warn=args.repeat_warn, max_docs=args.max_docs,
                           json_path=args.json)
    except USER_ERRORS as e:
        report_error(e)
        sys.exit(2)


def _plan_memory_main(argv: list[str]) -> None:
    from anneal.host_plan import HostRates

    defaults = HostRates()
    parser = argparse.ArgumentParser(
        prog="anneal-plan memory",
        description="GPU and host memory per rank of a recipe under a parallel layout (anneal/memory_plan.py, "
                    "anneal/host_plan.py): weights, masters, gradients, optimizer state (on the host with "
                    "parallel.offload=optimizer), activations, all-to-all buffers, whether it fits, PCIe traffic "
                    "and a step-time estimate.")
    parser.add_argument("overrides", nargs="*", help="recipe=... and key=value overrides, as for `anneal` "
                        "(parallel.ep_size, parallel.zero_stage, parallel.offload, trainer.micro_batch_size, "
                        "data.seq_len, model.recompute, ...)")
    parser.add_argument("--gpus", type=int, default=None, help="number of GPUs (default: parallel.ep_size)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU (GiB)")
    parser.add_argument("--reserve-gb", type=float, default=6.0,
                        help="kept free for the CUDA context, NCCL and allocator fragmentation")
    parser.add_argument("--host-mem-gb", type=float, default=None, help="host memory of one node (GiB)")
    parser.add_argument("--pcie-gb-s", type=float, default=defaults.pcie_gb_s, help="host<->GPU GB/s per GPU")
    parser.add_argument("--cpu-adam-params-per-s", type=float, default=defaults.cpu_adam_params_per_s,
                        help="CPU Adam throughput of one node (parameters/s)")
    args = parser.parse_intermixed_args(argv)
    try:
        from anneal.host_plan import fit_summary, format_host_plan, plan_host
        from anneal.memory_plan import format_memory_plan, layout_from_config, model_config_for_plan, plan_memory
        from anneal.train.schedule import parse_tokens

        cfg = compose(args.overrides)
        mcfg, source = model_config_for_plan(cfg)
        lay = layout_from_config(cfg, args.gpus or cfg.parallel.ep_size, args.gpus_per_node, args.gpu_mem_gb,
                                 args.reserve_gb, args.host_mem_gb)
        rates = HostRates(pcie_gb_s=args.pcie_gb_s, cpu_adam_params_per_s=args.cpu_adam_params_per_s)
        plan = plan_memory(mcfg, lay)
        host = plan_host(mcfg, plan, rates)
        tokens = sum(parse_tokens(s.tokens, f"schedule stage {s.name!r} tokens") for s in cfg.schedule.stages)
        out = "\n".join([format_memory_plan(mcfg, plan, source), format_host_plan(host, rates, tokens), "",
                         fit_summary(plan, host)])
    except USER_ERRORS as e:
        report_error(e)
        sys.exit(2)
    print(out)


def eval_main(argv: list[str] | None = None) -> None:
    """`anneal-eval EXPORT_OR_RUN [--tasks ...] [--backend hf|vllm]`: benchmark an HF export with
    lm-evaluation-harness on the bundled tasks (or task YAMLs); results to evals.jsonl in the run
    folder (an export or soup of no run: its own folder) and to the run's W&B project when it logs there."""
    from anneal.evals.tasks import bundled_tasks

    parser = argparse.ArgumentParser(prog="anneal-eval", description=eval_main.__doc__)
    parser.add_argument("export", help="an HF export folder, or a run folder holding hf/")
    parser.add_argument("--tasks", nargs="+", default=["gsm8k"],
                        help=f"bundled tasks ({', '.join(bundled_tasks())}) or task YAML paths")
    parser.add_argument("--backend", default="hf", choices=("hf", "vllm"))
    parser.add_argument("--limit", type=int, default=None, help="items per task (a seeded sample)")
    parser.add_argument("--shots", type=int, default=None, help="k-shot (default: each task's)")
    parser.add_argument("--device", default="cpu", help="hf backend: cpu, cuda, cuda:0 ...")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--batch-size", default="8", help="the harness's batch size (or 'auto')")
    parser.add_argument("--run-dir", default=None,
                        help="where evals.jsonl goes (default: the export's run, else the export folder)")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="run model-written code for HumanEval pass@1 (sandboxed subprocess, no network)")
    args = parser.parse_args(argv)
    try:
        from anneal.evals.harness import evaluate_export

        batch = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
        evaluate_export(args.export, args.tasks, run_dir=args.run_dir, backend=args.backend, limit=args.limit,
                        shots=args.shots, allow_code_execution=args.allow_code_execution, device=args.device,
                        batch_size=batch, dtype=args.dtype)
    except USER_ERRORS as e:
        report_error(e)
        sys.exit(2)
