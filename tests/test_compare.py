"""anneal-compare (anneal.compare) on a real sweep of two tiny anneals and a soup of their exports:
the exports scored with --eval reproduce their runs' logged final eval losses (same held-out
documents, same eval function), so the soup's row is comparable; the table and PNG are written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from anneal.checkpoints.soup import make_soup
from anneal.checkpoint_cli import compare_main
from anneal.cli import compose
from anneal.compare import compare, comparison_table
from anneal.errors import AnnealError
from anneal.train.loop import train

TINY_RUN = ["schedule.stages.0.tokens=1024", "schedule.stages.1.tokens=1024", "schedule.batch_tokens=512",
            "data.seq_len=64", "data.eval_seqs=2", "trainer.micro_batch_size=8", "trainer.threads=1",
            "logging.wandb=false", "logging.progress=false", "logging.plots=false",
            "export.dtype=float32",  # fp32 export: --eval must reproduce the logged loss to rounding
            "eval.tasks=[{task: humaneval, limit: 2}, {task: gsm8k, limit: 2, shots: 1}]"]  # benchmark columns


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """runs/sweep/{0,1}: two anneals of the shipped tiny checkpoint that differ in the data seed,
    laid out as `anneal --multirun seed=1,2 run.name=sweep` lays them out."""
    root = tmp_path_factory.mktemp("runs") / "sweep"
    for job, seed in (("0", 1), ("1", 2)):
        train(compose([*TINY_RUN, f"seed={seed}", f"run.dir={root / job}"]), root / job)
    return root


def final_eval(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r][-1]


def test_runs_exports_and_a_soup_in_one_table(sweep, tmp_path, capsys):
    soup = make_soup([sweep / "0" / "hf", sweep / "1" / "hf"], tmp_path / "soup").folder
    rows = compare([sweep], [sweep / "0" / "hf", sweep / "1" / "hf", soup])
    assert [(r.name, r.kind) for r in rows] == [("sweep/0", "run"), ("sweep/1", "run"), ("sweep/0/hf", "export"),
                                                ("sweep/1/hf", "export"), ("soup", "soup")]
    assert [r.differs for r in rows[:2]] == ["seed=1", "seed=2"]
    for run_row, export_row, job in zip(rows[:2], rows[2:4], ("0", "1")):
        logged = final_eval(sweep / job)
        assert run_row.eval_loss == logged["eval_loss"] and run_row.tokens == 2048
        assert set(export_row.per_source) == {"wiki", "gsm8k", "humaneval"} == set(run_row.per_source)
        for source, loss in run_row.per_source.items():   # the export, rescored, gives the run's numbers
            assert export_row.per_source[source] == pytest.approx(loss, abs=1e-5), source
    assert rows[0].eval_loss != rows[1].eval_loss        # two seeds, two models
    assert rows[4].eval_loss not in (rows[2].eval_loss, rows[3].eval_loss)

    png = tmp_path / "table.png"
    compare_main([str(sweep), "--eval", str(soup), "--out", str(png)])
    out = capsys.readouterr().out
    assert "sweep/0" in out and "sweep/1" in out and "soup" in out and "humaneval" in out
    assert f"{rows[4].eval_loss:.4f}" in out             # the soup's loss is in the printed table
    assert png.stat().st_size > 10_000


def test_benchmark_columns_for_runs_exports_and_a_soup_on_the_same_items(sweep, tmp_path, capsys):
    """The runs' last in-loop benchmark scores; their exports rescored on the same items give the
    same numbers, and the soup is scored on those items too; harness rows (evals.jsonl) join."""
    soup = make_soup([sweep / "0" / "hf", sweep / "1" / "hf"], tmp_path / "soup").folder
    rows = compare([sweep], [sweep / "0" / "hf", soup])
    cols = {"humaneval/logprob_per_byte", "gsm8k/logprob_per_byte"}
    assert all(set(r.bench) == cols for r in rows)
    logged = final_eval(sweep / "0")
    for col in cols:
        assert rows[0].bench[col] == logged[f"bench/{col}"]
        assert rows[2].bench[col] == pytest.approx(rows[0].bench[col], abs=1e-5), col   # export == its run
        assert rows[3].bench[col] not in (rows[0].bench[col], rows[1].bench[col])       # the soup, scored
    (sweep / "1" / "evals.jsonl").write_text(json.dumps(
        {"task": "gsm8k", "items": 2, "metrics": {"exact_match/strict-match": 0.5, "exact_match_stderr/strict-match": 0.5}}) + "\n")
    try:
        rows = compare([sweep])
        assert rows[1].bench["harness:gsm8k/exact_match/strict-match"] == 0.5 and len(rows[1].bench) == 3
        png = tmp_path / "bench.png"
        compare_main([str(sweep), "--out", str(png)])
        out = capsys.readouterr().out
        assert f"{rows[0].bench['gsm8k/logprob_per_byte']:.4f}" in out and "0.5000" in out
        assert png.stat().st_size > 10_000
    finally:
        (sweep / "1" / "evals.jsonl").unlink()


def test_a_soup_evaluated_on_its_own_gets_harness_columns(sweep, tmp_path):
    """anneal-eval on a soup of no run writes evals.jsonl into the soup's folder, and anneal-compare
    reads it there: the soup's row gets the harness columns, the runs' rows do not."""
    pytest.importorskip("lm_eval")
    from anneal.cli import eval_main

    soup = make_soup([sweep / "0" / "hf", sweep / "1" / "hf"], tmp_path / "soup").folder
    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"q": f"Is {n} even?", "label": n % 2}) + "\n"
                                                  for n in (2, 3)))
    (tmp_path / "parity.yaml").write_text(yaml.safe_dump({
        "name": "parity", "kind": "multiple_choice", "data": {"test": "items.jsonl"}, "split": "test",
        "fields": ["q", "label"], "template": "{q}", "choices": ["yes", "no"], "answer": "label"}))
    eval_main([str(soup), "--tasks", str(tmp_path / "parity.yaml"), "--dtype", "float32"])
    logged = json.loads((soup / "evals.jsonl").read_text())
    assert logged["task"] == "parity" and logged["items"] == 2
    assert not any((sweep / job / "evals.jsonl").exists() for job in ("0", "1"))
    rows = compare([sweep], [soup])
    assert rows[-1].bench["harness:parity/acc"] == logged["metrics"]["acc"]
    assert not any(k.startswith("harness:") for r in rows[:2] for k in r.bench)
    assert "harness:parity/acc" in [c.header for c in comparison_table(rows).columns]


def test_not_a_run_is_one_clear_error(sweep, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        compare_main([str(tmp_path), "--out", str(tmp_path / "t.png")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "neither a run folder" in err and "Traceback" not in err
    assert not (tmp_path / "t.png").exists()


def test_a_document_masked_run_is_rescored_with_its_mask(sweep, tmp_path):
    """model.document_mask reaches the trainer's evals and anneal-compare's rescoring: the fp32
    export of a masked run, scored with --eval, gives the run's logged losses (scored without the
    mask it would not: the held-out rows are packed), and masked and unmasked runs cannot share one
    --eval."""
    run = tmp_path / "masked"
    train(compose([*TINY_RUN, "seed=1", "model.document_mask=true", f"run.dir={run}"]), run)
    assert final_eval(run)["eval_loss"] != final_eval(sweep / "0")["eval_loss"]  # same data, other attention
    rows = compare([run], [run / "hf"])
    for source, loss in rows[0].per_source.items():
        assert rows[1].per_source[source] == pytest.approx(loss, abs=1e-5), source
    with pytest.raises(AnnealError, match="model.document_mask"):
        compare([sweep / "0", run], [run / "hf"])


def test_anneal_export_and_the_runs_export_soup_together(sweep, tmp_path):
    """anneal-export's anneal_meta.json and the trainer's export share one schema (started_from),
    so a soup of the run's export and an anneal-export of its last checkpoint is accepted."""
    from anneal.checkpoints.export import export_training_checkpoint

    exported = export_training_checkpoint(sweep / "0", tmp_path / "exported", dtype="float32")
    metas = [json.loads((d / "anneal_meta.json").read_text()) for d in (sweep / "0" / "hf", exported)]
    assert metas[0]["started_from"] == metas[1]["started_from"] == "tiny-stable"
    assert all(metas[0][k] == v for k, v in metas[1].items())      # the same keys mean the same
    assert make_soup([sweep / "0" / "hf", exported], tmp_path / "soup").folder.is_dir()


def test_differs_column_folds_instead_of_cutting(tmp_path):
    from io import StringIO

    from rich.console import Console

    from anneal.compare import Row, comparison_table

    differs = "data.mixture=/a/long/path/to/a/users/own/mixture_file.yaml schedule.stages.1.lr_end=1e-05 seed=7"
    rows = [Row("sweep/0", "run", 2048, 4.5, {"wiki": 4.0, "gsm8k": 5.0}, differs),
            Row("sweep/1", "run", 2048, 4.6, {"wiki": 4.1, "gsm8k": 5.1}, "seed=8")]
    for width in (80, 120):
        buf = StringIO()
        Console(file=buf, width=width).print(comparison_table(rows))
        text = buf.getvalue()
        assert "…" not in text and max(map(len, text.splitlines())) <= width
        cells = "".join(line.split("│")[-2].strip() for line in text.splitlines() if line.count("│") > 2)
        assert differs.replace(" ", "") in cells.replace(" ", "")   # every character, in order
