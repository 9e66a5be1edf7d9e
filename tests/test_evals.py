"""Benchmark evals (anneal.evals): task files and their bad input, the training-mixture overlap
check, scores known by construction, the same scores as lm-evaluation-harness on the same items
and export, and in the training loop."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from anneal.checkpoints.hf_load import load_hf_checkpoint
from anneal.errors import AnnealError
from anneal.evals.overlap import check_no_overlap, find_overlaps
from anneal.evals.scoring import build_requests, encode_pair, rank_items, score_tasks
from anneal.evals.tasks import load_task

TINY = Path(__file__).resolve().parents[1] / "anneal" / "assets" / "tiny-stable"
GSM8K_ITEMS = Path(__file__).resolve().parents[1] / "anneal" / "evals" / "tasks" / "gsm8k_test.jsonl"
CHNSENTICORP = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "chnsenticorp_htl.csv"


def _final(answer: str) -> str:
    return answer.rsplit("####", 1)[1].strip()


def mc_task(folder: Path, n: int = 12, shots: int = 2, **extra) -> Path:
    """A multiple-choice task from bundled GSM8K items: which number is the final answer (the
    gold one or the answers of three other items)."""
    rows = [json.loads(line) for line in GSM8K_ITEMS.read_text().splitlines()][:n + shots + 3]
    finals = [_final(r["answer"]) for r in rows]
    items = []
    for i, r in enumerate(rows[:n + shots]):
        others = [f for f in dict.fromkeys(finals[i + 1:] + finals[:i]) if f != finals[i]][:3]
        choices = sorted([finals[i], *others], key=lambda s: (len(s), s))
        items.append({"question": r["question"], "choices": choices, "label": choices.index(finals[i])})
    (folder / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items[shots:]))
    (folder / "shots.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items[:shots]))
    spec = {"name": "gsm8k_mc", "kind": "multiple_choice",
            "data": {"test": "items.jsonl", "fewshot": "shots.jsonl"}, "split": "test", "fewshot_split": "fewshot",
            "shots": shots, "fields": ["question", "choices", "label"], "template": "Question: {question}\nAnswer:",
            "choices": "choices", "answer": "label", **extra}
    path = folder / "gsm8k_mc.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer

    model, _ = load_hf_checkpoint(TINY, dtype=torch.float32, device="cpu")
    return model.eval(), AutoTokenizer.from_pretrained(str(TINY))


# ------------------------------------------------------------------------------- bad input
def _write(folder: Path, spec: dict, rows: list[dict]) -> Path:
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / "task.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "kind": "generative", "data": {"test": "items.jsonl"},
                                    "split": "test", "fields": ["q", "a"], "template": "Q: {q}\nA:",
                                    "target": "{a}", **spec}))
    return path


ROWS = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(3)]


@pytest.mark.parametrize("spec, rows, message", [
    ({"fields": ["q", "a", "z"]}, ROWS, r"eval task t .*: fields: split 'test' has no field 'z'"),
    ({"template": "Q: {q} {context}"}, ROWS, r"eval task t .*: template: refers to \{context\}"),
    ({"target": "{solution}"}, ROWS, r"eval task t .*: target: refers to \{solution\}"),
    ({"shots": 3}, ROWS, r"eval task t .*: shots: 3 shots but split 'test' has 3 items"),
    ({"kind": "multiple_choice", "choices": ["x", "y"], "answer": "a"}, ROWS, r"eval task t .*: answer: item 0"),
    ({"kind": "multiple_choice", "answer": "a"}, ROWS, r"eval task t .*: choices: missing"),
    ({"split": "dev"}, ROWS, r"eval task t .*: split: 'dev' is not a split"),
    ({"data": {"test": "nope.jsonl"}}, ROWS, r"eval task t .*: data.test: .*nope.jsonl: no such file"),
    ({"temlpate": "x"}, ROWS, r"eval task t .*: temlpate: unknown key"),
    ({}, [*ROWS, {"q": "question 3"}], r"eval task t \(.*task.yaml\): fields: item 3 of split 'test' "
                                       r"\(.*items.jsonl\) has no 'a' .*skip_incomplete_items"),
    ({}, [ROWS[0], {"q": None, "a": "answer 1"}, ROWS[2]],
     r"eval task t .*: fields: item 1 of split 'test' .* has no 'q'"),
])
def test_bad_task_file_gives_one_line_naming_task_and_field(tmp_path, spec, rows, message):
    with pytest.raises(AnnealError, match=message) as e:
        load_task(str(_write(tmp_path, spec, rows)))
    assert "\n" not in str(e.value)


def test_skip_incomplete_items_drops_only_the_items_missing_a_field(tmp_path):
    """The opt-out of the error above, for a source with known gaps (ChnSentiCorp's empty review)."""
    task = load_task(str(_write(tmp_path, {"skip_incomplete_items": True}, [*ROWS, {"q": "question 3"}])))
    assert task.items == ROWS


@pytest.mark.skipif(not CHNSENTICORP.is_file(), reason="shared corpus not present")
def test_chnsenticorp_loads_from_the_public_csv_with_its_empty_review(monkeypatch):
    monkeypatch.setenv("ANNEAL_CHNSENTICORP", str(CHNSENTICORP))
    task = load_task("chnsenticorp")
    assert len(task.items) == 500 and all(it["review"] for it in task.items)


def test_bundled_items_are_held_out_of_the_demo_mixture_and_the_check_is_real(tmp_path):
    from mixtures import load_mixture
    from mixtures.sources import load_sources

    spec = load_mixture("demo")
    bundled = [load_task("gsm8k"), load_task("humaneval")]
    assert check_no_overlap(bundled, spec) == []
    # the HumanEval items are exactly the documents the demo mixture holds out
    humaneval = next(s for s in load_sources(spec) if s.spec.name == "humaneval")
    assert sorted(humaneval.heldout_texts()) == sorted(
        (it["prompt"] + it["canonical_solution"]).strip() for it in bundled[1].items)
    # an item the mixture trains on (a line of its GSM8K file) is found and named
    trained = json.loads((Path(spec.path).parent.parent / "data" / "gsm8k_train_2000.jsonl").open().readline())
    rows = [{"q": r["question"], "a": r["answer"]} for r in
            [json.loads(line) for line in GSM8K_ITEMS.read_text().splitlines()[:3]] + [trained]]
    task = load_task(str(_write(tmp_path, {}, rows)))
    assert find_overlaps([task], spec)[0] == [("t", 3, "q", "gsm8k")]
    with pytest.raises(AnnealError, match=r"eval task t: item 3 field 'q' is in the training mixture demo \(source gsm8k\)"):
        check_no_overlap([task], spec)


# ------------------------------------------------------------------- known by construction
def test_scores_known_by_construction_uniform_head(tiny, tmp_path):
    """With a zero LM head every next token has probability 1/V, so a continuation of n tokens
    has log-likelihood -n log V exactly: the fewest-token choice wins `acc`, and the per-byte
    log-likelihood of a gold answer is -n log V / bytes."""
    model, tok = tiny
    import copy

    flat = copy.deepcopy(model)
    with torch.no_grad():
        flat.lm_head.weight.zero_()
    vocab = flat.config.vocab_size
    path = mc_task(tmp_path, n=8, shots=1)
    task = load_task(str(path))
    gen = load_task(str(_write(tmp_path, {}, ROWS)))
    out = score_tasks(flat, [task, gen], tok, torch.device("cpu"), batch_tokens=1024)
    acc = acc_norm = 0
    for item in task.items:
        ctx = task.context(item)
        n_tok = [len(encode_pair(tok, ctx, c)[1]) for c in task.continuations(item)]
        chars = [len(c) for c in task.choices_of(item)]
        lls = [-n * math.log(vocab) for n in n_tok]
        acc += int(max(range(len(lls)), key=lls.__getitem__) == item["label"])
        acc_norm += int(max(range(len(lls)), key=lambda k: lls[k] / chars[k]) == item["label"])
    assert out["bench/gsm8k_mc/acc"] == acc / len(task.items)
    assert out["bench/gsm8k_mc/acc_norm"] == acc_norm / len(task.items)
    n_tokens = sum(len(encode_pair(tok, gen.context(it), gen.continuations(it)[0])[1]) for it in gen.items)
    n_bytes = sum(len((" " + it["a"]).encode()) for it in gen.items)
    assert out["bench/t/logprob_per_byte"] == pytest.approx(-n_tokens * math.log(vocab) / n_bytes, rel=1e-6)
    assert out["bench/t/logprob_per_token"] == pytest.approx(-math.log(vocab), rel=1e-6)


def test_a_certain_choice_is_always_picked(tiny, tmp_path):
    """Choices that are one token each, and a head patched so that the gold token's logit is huge:
    acc and acc_norm are 1; patched towards a wrong choice, they are 0."""
    model, tok = tiny
    import copy

    words = [w for w in ("A", "B", "C", "D") if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    assert len(words) >= 2
    rows = [{"q": f"question {i}", "a": "x", "label": 0} for i in range(4)]
    path = _write(tmp_path, {"kind": "multiple_choice", "fields": ["q", "a", "label"], "choices": words,
                             "answer": "label", "target": None}, rows)
    task = load_task(str(path))
    for pick, want in ((0, 1.0), (1, 0.0)):
        certain = copy.deepcopy(model)
        certain.lm_head = CertainHead(tok(" " + words[pick], add_special_tokens=False)["input_ids"][0],
                                      model.config.vocab_size)
        out = score_tasks(certain, [task], tok, torch.device("cpu"))
        assert out["bench/t/acc"] == want and out["bench/t/acc_norm"] == want


class CertainHead(torch.nn.Module):
    """An LM head that gives one token probability ~1 whatever the hidden state."""

    def __init__(self, token: int, vocab: int):
        super().__init__()
        self.token, self.vocab = token, vocab

    def forward(self, h):
        logits = torch.zeros(*h.shape[:-1], self.vocab)
        logits[..., self.token] = 100.0
        return logits


# ------------------------------------------------------------ against lm-evaluation-harness
def test_in_loop_scores_equal_the_harness_on_the_same_items_and_export(tiny, tmp_path):
    """The same prompts and continuations (string for string), the same log-likelihoods, and the
    same acc / acc_norm / acc_bytes as lm-evaluation-harness's hf backend on the same export."""
    pytest.importorskip("lm_eval")
    from anneal.evals.harness import evaluate_export

    model, tok = tiny
    task = load_task(str(mc_task(tmp_path, n=5, shots=1)))
    ours = score_tasks(model, [task], tok, torch.device("cpu"), batch_tokens=2048)
    requests = build_requests([task], tok, rank_items([task], 0, 1))
    theirs = evaluate_export(TINY, [str(task.path)], run_dir=tmp_path, log_samples=True, batch_size=4)
    samples = sorted(theirs["samples"]["gsm8k_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(task.items)
    from anneal.evals.scoring import loglikelihoods

    lls = loglikelihoods(model, requests, torch.device("cpu"), model.config.max_position_embeddings, 2048)
    for s, item in zip(samples, task.items):
        assert [tuple(a) for a in s["arguments"]] == [(task.context(item), c) for c in task.continuations(item)]
    theirs_ll = [ll for s in samples for ll, _ in s["filtered_resps"]]
    assert lls == pytest.approx(theirs_ll, abs=2e-3)
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert abs(ours[f"bench/gsm8k_mc/{metric}"] - theirs["gsm8k_mc"][metric]) * len(task.items) <= 1.0, metric
    rows = [json.loads(line) for line in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert rows[0]["task"] == "gsm8k_mc" and rows[0]["metrics"]["acc"] == theirs["gsm8k_mc"]["acc"]


def test_anneal_eval_gsm8k_exact_match_on_the_cpu_export(tmp_path):
    """The harness on the export: greedy decoding with GSM8K's answer extraction (a 2-item slice)."""
    pytest.importorskip("lm_eval")
    from anneal.cli import eval_main

    eval_main([str(TINY), "--tasks", "gsm8k", "--limit", "2", "--shots", "1", "--dtype", "float32", "--run-dir", str(tmp_path)])
    row = json.loads((tmp_path / "evals.jsonl").read_text().splitlines()[0])
    assert row["task"] == "gsm8k" and row["items"] == 2
    assert set(row["metrics"]) >= {"exact_match/strict-match", "exact_match/flexible-extract"}
    assert 0.0 <= row["metrics"]["exact_match/strict-match"] <= 1.0
    assert not (tmp_path / "wandb").exists()   # a folder with no run config logs to no W&B


def test_humaneval_pass_at_1_needs_explicit_opt_in(tmp_path):
    from anneal.cli import eval_main

    pytest.importorskip("lm_eval")
    with pytest.raises(SystemExit) as e:
        eval_main([str(TINY), "--tasks", "humaneval", "--run-dir", str(tmp_path)])
    assert e.value.code == 2


def test_sandbox_runs_code_without_network_in_limits():
    from anneal.evals.sandbox import passes, run_code

    task = load_task("humaneval")
    it = task.items[0]
    assert passes(it["prompt"] + it["canonical_solution"], it["test"], it["entry_point"])
    assert not passes(it["prompt"] + "    return None\n", it["test"], it["entry_point"])
    net = run_code("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert net.returncode != 0 and b"network disabled" in net.stderr
    assert run_code("x = bytearray(4 << 30)").returncode != 0
    assert run_code("while True: pass", timeout=1.0) is None


# ----------------------------------------------------------------- DeepSpeed EP 2 (gloo)
def _ep_worker(rank, world, task_path, want):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from anneal.parallel import ds_engine
    from anneal.parallel.layout import ParallelLayout

    ds_engine.init_distributed("cpu")
    model, _ = load_hf_checkpoint(TINY, dtype=torch.float32, device="cpu")
    tcfg = SimpleNamespace(micro_batch_size=1, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, grad_clip=1.0, bf16=False)
    ds_engine.DeepSpeedEngine(model, tcfg, ep_size=2, zero_stage=1)  # shards the experts over the 2 ranks
    assert model.expert_range != (0, model.config.n_routed_experts)
    task = load_task(task_path)
    got = score_tasks(model.eval(), [task, load_task("humaneval", limit=3)], AutoTokenizer.from_pretrained(str(TINY)),
                      torch.device("cpu"), ParallelLayout.current(ep_size=2), batch_tokens=1024)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


@pytest.mark.slow
def test_deepspeed_ep2_scores_equal_one_process(tiny, tmp_path):
    pytest.importorskip("deepspeed")
    from _dist import run_distributed

    model, tok = tiny
    path = str(mc_task(tmp_path, n=5, shots=1))  # an odd count: the ranks score unequal shares
    want = score_tasks(model, [load_task(path), load_task("humaneval", limit=3)], tok, torch.device("cpu"), batch_tokens=1024)
    run_distributed(_ep_worker, 2, path, want)


# ------------------------------------------------------------------------------- in the loop
def test_in_loop_scores_at_step_0_and_stage_ends_and_bad_task_stops_before_training(tmp_path):
    from anneal.cli import compose
    from anneal.train.loop import train

    task = mc_task(tmp_path, n=4, shots=1)
    base = [f"run.dir={tmp_path / 'run'}", "run.name=t", "logging.progress=false", "logging.plots=false",
            "logging.wandb=false", "trainer.threads=1", "data.seq_len=64", "data.eval_seqs=1",
            "trainer.micro_batch_size=4", "schedule.batch_tokens=256", "schedule.stages.0.tokens=256",
            "schedule.stages.1.tokens=256", "export.dtype=float32",
            f"eval.tasks=[{{task: {task}}}, {{task: humaneval, limit: 2}}]"]
    result = train(compose(base), tmp_path / "run")
    evals = [r for r in result["history"] if "bench/gsm8k_mc/acc" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]  # start, end of stage1, end of stage2
    assert all("eval_loss" in r and "bench/humaneval/logprob_per_byte" in r for r in evals)
    # the last in-loop scores are the export's
    model, _ = load_hf_checkpoint(Path(result["export_dir"]), dtype=torch.float32, device="cpu")
    from transformers import AutoTokenizer

    offline = score_tasks(model.eval(), [load_task(str(task)), load_task("humaneval", limit=2)],
                          AutoTokenizer.from_pretrained(result["export_dir"]), torch.device("cpu"))
    for k, v in offline.items():
        assert evals[-1][k] == pytest.approx(v, rel=1e-5), k

    bad = tmp_path / "bad.yaml"
    bad.write_text(task.read_text().replace("{question}", "{context}"))
    with pytest.raises(AnnealError, match=r"eval task gsm8k_mc .*: template: refers to \{context\}"):
        train(compose([*base[:-1], f"run.dir={tmp_path / 'run2'}", f"eval.tasks=[{{task: {bad}}}]"]), tmp_path / "run2")
    assert not (tmp_path / "run2" / "metrics.jsonl").exists() or \
        "loss" not in (tmp_path / "run2" / "metrics.jsonl").read_text()


# ----------------------------------------------------------------------- after the export
def _tiny_run(tmp_path: Path, *extra: str) -> list[str]:
    """Overrides of a two-step tiny anneal in tmp_path/run, quiet, W&B offline."""
    return [f"run.dir={tmp_path / 'run'}", "run.name=t", "logging.progress=false", "logging.plots=false",
            "logging.mode=offline", "trainer.threads=1", "data.seq_len=64", "data.eval_seqs=1",
            "trainer.micro_batch_size=4", "schedule.batch_tokens=256", "schedule.stages.0.tokens=256",
            "schedule.stages.1.tokens=256", "export.dtype=float32", *extra]


def wandb_runs(run_dir: Path, wait_s: float = 30.0) -> dict[str, tuple[object, list[dict]]]:
    """job type -> (run record, history rows) of every offline W&B run under `run_dir`/wandb, read
    from its .wandb file (W&B's LevelDB-style log of protobuf records). A run finished after another
    in the same process reaches its file a moment after `finish()` returns: wait for its exit record."""
    import time

    deadline = time.monotonic() + wait_s
    out = {}
    for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        while "exit" not in (records := _wandb_records(path)) and time.monotonic() < deadline:
            time.sleep(0.1)
        run = records["run"][0].run
        out[run.job_type] = (run, [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                                   for r in records.get("history", [])])
    return out


def _wandb_records(path: Path) -> dict[str, list]:
    """The records of a .wandb file by type (run, history, exit, ...)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, records = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:                    # a block's tail too short for a record header
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):                              # a whole record, or a record's last part
            rec = pb.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            records.setdefault(rec.WhichOneof("record_type"), []).append(rec)
    return records


@pytest.fixture(scope="module")
def run_evaluated_after_export(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny anneal on the CPU with `eval.after_export=true`, an MC task and HumanEval (pass@1 opted
    in), two items each, W&B offline."""
    from anneal.cli import compose
    from anneal.train.loop import train

    tmp_path = tmp_path_factory.mktemp("after_export")
    task = mc_task(tmp_path, n=4, shots=1)
    cfg = compose(_tiny_run(tmp_path, "trainer.device=cpu", "eval.after_export=true", "eval.allow_code_execution=true",
                            f"eval.tasks=[{{task: {task}}}, {{task: humaneval, limit: 1}}]", "eval.harness_limit=2"))
    return tmp_path / "run", train(cfg, tmp_path / "run")


def test_after_export_refuses_code_execution_at_start_up_unless_allowed(tmp_path):
    """HumanEval among the after-export tasks (by default those of eval.tasks) stops the run before
    its first step unless eval.allow_code_execution is set; with it the start-up check passes."""
    from anneal.cli import compose
    from anneal.evals.callback import check_after_export
    from anneal.train.loop import train

    cfg = compose(_tiny_run(tmp_path, "logging.wandb=false", "eval.tasks=[{task: humaneval, limit: 1}]",
                            "eval.after_export=true"))
    with pytest.raises(AnnealError, match=r"^eval task humaneval: pass@1 runs the model's code; "
                                          r"set eval\.allow_code_execution=true") as e:
        train(cfg, tmp_path / "run")
    assert "\n" not in str(e.value)
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or "loss" not in metrics.read_text()
    cfg.eval.allow_code_execution = True
    check_after_export(cfg.eval)
    cfg.eval.harness_tasks = ["gsm8k"]   # or the code-running task left out
    cfg.eval.allow_code_execution = False
    check_after_export(cfg.eval)


def test_after_export_scores_the_loops_items_by_default(tmp_path):
    """With eval.harness_tasks unset, the export is scored on the items and shots the loop scores
    (each eval.tasks entry's own limit and shots); eval.harness_limit caps them; harness_tasks names
    its own."""
    from anneal.cli import compose
    from anneal.evals.callback import after_export_tasks, load_tasks

    cfg = compose(_tiny_run(tmp_path, "logging.wandb=false", "eval.tasks=[{task: gsm8k, limit: 5, shots: 1}]",
                            "eval.after_export=true"))
    (loop,), (export,) = load_tasks(cfg.eval.tasks), after_export_tasks(cfg.eval)
    assert export.items == loop.items and len(export.items) == 5
    assert export.shots_n == loop.shots_n == 1 and export.shots == loop.shots
    cfg.eval.harness_limit = 2
    assert len(after_export_tasks(cfg.eval)[0].items) == 2
    cfg.eval.harness_limit, cfg.eval.harness_tasks = None, ["gsm8k"]
    assert len(after_export_tasks(cfg.eval)[0].items) > 5     # the task's own items, not the loop's limit


def test_after_export_without_an_export_is_refused_at_start_up(tmp_path):
    """eval.after_export with export.enabled=false would evaluate nothing: one line at start-up."""
    from anneal.cli import compose
    from anneal.train.loop import train

    cfg = compose(_tiny_run(tmp_path, "logging.wandb=false", "eval.tasks=[{task: gsm8k, limit: 1}]",
                            "eval.after_export=true", "export.enabled=false"))
    with pytest.raises(AnnealError, match=r"^eval\.after_export=true but export\.enabled=false") as e:
        train(cfg, tmp_path / "run")
    assert "\n" not in str(e.value)


def test_after_export_scores_the_export_into_the_run_folder_and_its_wandb_run(run_evaluated_after_export):
    """evals.jsonl in the run folder: the MC task and HumanEval's pass@1 (opted in), scored on the
    run's device in its compute dtype (CPU: fp32) at the export's step; the same scores in the
    training run's W&B run at that step."""
    run_dir, result = run_evaluated_after_export
    rows = {r["task"]: r for r in map(json.loads, (run_dir / "evals.jsonl").read_text().splitlines())}
    assert set(rows) == {"gsm8k_mc", "humaneval"}
    for row in rows.values():
        assert row["export"] == result["export_dir"] and row["items"] == 2
        assert (row["device"], row["dtype"]) == ("cpu", "float32")
        assert (row["step"], row["tokens"]) == (result["step"], result["tokens"])
    assert set(rows["gsm8k_mc"]["metrics"]) == {"acc", "acc_norm", "acc_bytes"}
    assert 0.0 <= rows["humaneval"]["metrics"]["pass@1"] <= 1.0
    _, history = wandb_runs(run_dir)[""]           # the training run (no job type)
    logged = next(h for h in history if "harness/gsm8k_mc/acc" in h)
    assert logged["harness/gsm8k_mc/acc"] == rows["gsm8k_mc"]["metrics"]["acc"]
    assert logged["harness/humaneval/pass@1"] == rows["humaneval"]["metrics"]["pass@1"]
    assert (logged["_step"], logged["tokens"]) == (result["step"], result["tokens"])


def test_anneal_eval_logs_to_the_runs_wandb_project_as_a_job_of_its_own(run_evaluated_after_export):
    """anneal-eval on a run folder whose config logs to W&B (offline): a second W&B run under the run
    folder, of job type anneal-eval in the run's project, with the evals.jsonl row's scores logged
    at the export's step and tokens."""
    from anneal.cli import eval_main

    run_dir, result = run_evaluated_after_export
    eval_main([str(run_dir), "--tasks", str(run_dir.parent / "gsm8k_mc.yaml"), "--limit", "2", "--dtype", "float32"])
    row = json.loads((run_dir / "evals.jsonl").read_text().splitlines()[-1])
    job, history = wandb_runs(run_dir)["anneal-eval"]
    assert job.project == "anneal" and job.display_name == "run/anneal-eval"
    assert len(history) == 1
    logged = {k: v for k, v in history[0].items() if k not in ("_runtime", "_timestamp")}
    assert logged == {**{f"harness/gsm8k_mc/{k}": v for k, v in row["metrics"].items()},
                      "tokens": result["tokens"], "_step": result["step"]}


def test_after_export_runs_on_the_runs_device_in_its_compute_dtype():
    from anneal.evals.callback import harness_device_and_dtype
    from anneal.model.precision import PrecisionPolicy

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    bf16_on_cuda = PrecisionPolicy(torch.bfloat16)   # what for_device(True, cuda) gives on a bf16 GPU
    assert harness_device_and_dtype(bf16_on_cuda, cuda) == ("cuda:0", "bfloat16")
    assert harness_device_and_dtype(PrecisionPolicy.for_device(False, cuda), cuda) == ("cuda:0", "float32")
    cpu_asked_bf16 = PrecisionPolicy.for_device(True, cpu, note=lambda _: None)
    assert harness_device_and_dtype(cpu_asked_bf16, cpu) == ("cpu", "float32")
