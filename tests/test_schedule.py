"""Tests for anneal.train.schedule (token-indexed WSD schedule), anneal.train.batch_ramp and anneal.train.plots."""

import math

import pytest
from omegaconf import OmegaConf

from anneal.errors import AnnealError
from anneal.train.batch_ramp import BatchRamp
from anneal.train.schedule import Schedule, ScheduleError, Stage, format_tokens, parse_tokens

EXACT = dict(rel=1e-12, abs=0)


def five_shapes() -> Schedule:
    """warmup linear 0->3e-4 | stable const | cosine 3e-4->1e-4 | 1-sqrt 1e-4->0 | jump to 2e-5 linear ->1e-5."""
    return Schedule(
        [
            Stage("warmup", 1000, 3e-4),
            Stage("stable", 2000, 3e-4, shape="constant"),
            Stage("cos", 1000, 1e-4, shape="cosine"),
            Stage("sqrt", 1000, 0.0, shape="1-sqrt"),
            Stage("tail", 1000, 1e-5, lr_start=2e-5),
        ]
    )


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "tokens, lr",
    [
        (0, 0.0),  # warmup start
        (250, 0.75e-4),
        (500, 1.5e-4),  # warmup mid
        (1000, 3e-4),  # warmup end == stable start
        (2000, 3e-4),  # stable mid
        (3000, 3e-4),  # stable end == cosine start
        (3250, 1e-4 + 2e-4 * (1 + math.sqrt(0.5)) / 2),  # cos(pi/4)
        (3500, 2e-4),  # cosine mid: e + (s-e)/2
        (4000, 1e-4),  # cosine end == 1-sqrt start
        (4250, 5e-5),  # 1-sqrt at p=1/4: 1e-4 * (1 - 0.5)
        (4500, 1e-4 * (1 - math.sqrt(0.5))),  # 1-sqrt mid
        (5000, 2e-5),  # 1-sqrt end (0) belongs to the next stage, which jumps to its lr_start
        (5500, 1.5e-5),  # tail mid
        (6000, 1e-5),  # end of schedule
        (10**12, 1e-5),  # past the end: stays at the last lr_end
    ],
)
def test_lr_values_every_shape(tokens, lr):
    assert five_shapes().lr_at(tokens) == pytest.approx(lr, **EXACT)


def test_boundary_values_are_exact():
    s = five_shapes()
    assert s.lr_at(0) == 0.0
    assert s.lr_at(1000) == 3e-4
    assert s.lr_at(4000) == 1e-4
    assert s.lr_at(5000) == 2e-5
    assert s.lr_at(6000) == 1e-5
    # each stage's own end value (progress 1) is exactly its lr_end
    for i, st in enumerate(s.stages):
        assert s.stage_lr(i, 1.0) == st.lr_end
        assert s.stage_lr(i, 0.0) == s.stage_lr_start(st.name)


def test_dots1_anneal_values():
    s = Schedule.dots1_anneal("1T", "200B")
    assert s.stage_names == ["stage1", "stage2"]
    assert s.lr_at(0) == 3e-4
    assert s.lr_at(10**12) == 3e-5  # end of stage 1 == start of stage 2
    assert s.lr_at(1_200_000_000_000) == 1e-5  # end of stage 2
    assert s.lr_at(5 * 10**11) == pytest.approx((3e-4 + 3e-5) / 2, **EXACT)
    assert s.lr_at(1_100_000_000_000) == pytest.approx(2e-5, **EXACT)
    assert s.total_tokens == 1_200_000_000_000
    assert [st.shape for st in s.stages] == ["linear", "linear"]


def test_dots1_anneal_shape_override():
    s = Schedule.dots1_anneal(1000, 200, shape="cosine")
    assert [st.shape for st in s.stages] == ["cosine", "cosine"]
    assert s.lr_at(500) == pytest.approx(3e-5 + (3e-4 - 3e-5) / 2, **EXACT)
    assert s.lr_at(1000) == 3e-5 and s.lr_at(1200) == 1e-5


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_continuity_at_boundaries(shape):
    big = 10**12
    s = Schedule(
        [Stage("warmup", big, 3e-4), Stage("stable", big, 3e-4, shape="constant"),
         Stage("stage1", big, 3e-5, shape=shape), Stage("stage2", big, 1e-5, shape=shape)]
    )
    for i, name in enumerate(s.stage_names[1:], start=1):
        b = s.stage_start(name)
        assert s.stage_lr(i - 1, 1.0) == s.lr_at(b)  # previous stage ends where this one starts
        assert s.lr_at(b - 1) == pytest.approx(s.lr_at(b), rel=1e-5)  # and no jump just before
        # 1-sqrt is steep at p=0 (derivative ~ 1/sqrt(p)) but still continuous
        assert s.lr_at(b + 1) == pytest.approx(s.lr_at(b), rel=1e-5)


def test_stage_at_and_boundaries():
    s = five_shapes()
    assert s.total_tokens == 6000
    assert s.stage_names == ["warmup", "stable", "cos", "sqrt", "tail"]
    assert (s.stage_start("stable"), s.stage_end("stable")) == (1000, 3000)
    assert (s.stage_start("warmup"), s.stage_end("tail")) == (0, 6000)
    assert s.stage_at(0).name == "warmup"
    assert s.stage_at(999).name == "warmup"
    assert s.stage_at(1000).name == "stable"  # a stage's end belongs to the next stage
    assert s.stage_at(2999.5).name == "stable"
    assert s.stage_at(3000).name == "cos"
    assert s.stage_at(6000).name == "tail"  # past the end: the last stage
    assert s.stage_at(10**15).name == "tail"
    assert s.stage("cos").shape == "cosine"
    assert s.stage_lr_start("tail") == 2e-5 and s.stage_lr_start("cos") == 3e-4


def test_bad_queries():
    s = five_shapes()
    with pytest.raises(ScheduleError, match="no stage named 'nope'"):
        s.stage_start("nope")
    with pytest.raises(ScheduleError, match=">= 0"):
        s.lr_at(-1)
    with pytest.raises(ScheduleError):
        s.stage_at(float("nan"))


def test_with_start_lr():
    s = Schedule.dots1_anneal(1000, 200)
    t = s.with_start_lr(2.5e-4)
    assert t.lr_at(0) == 2.5e-4
    assert t.lr_at(500) == pytest.approx((2.5e-4 + 3e-5) / 2, **EXACT)
    assert t.lr_at(1000) == 3e-5 and t.lr_at(1200) == 1e-5
    assert s.lr_at(0) == 3e-4  # the original is unchanged
    assert t.stage_names == s.stage_names and t.total_tokens == s.total_tokens


def test_with_start_lr_replaces_explicit_lr_start_and_keeps_constant_constant():
    s = Schedule([Stage("stage1", 100, 1e-5, lr_start=3e-4), Stage("stage2", 100, 0.0)])
    assert s.with_start_lr(1e-4).lr_at(0) == 1e-4
    c = Schedule([Stage("stable", 100, 3e-4, shape="constant"), Stage("decay", 100, 0.0)], start_lr=3e-4)
    d = c.with_start_lr(2e-4)
    assert d.lr_at(0) == d.lr_at(99) == d.lr_at(100) == 2e-4  # decay continues from the new LR
    assert d.lr_at(150) == pytest.approx(1e-4, **EXACT)


def test_with_start_lr_below_stage_end_is_a_clear_error():
    s = Schedule.dots1_anneal(1000, 200)
    with pytest.raises(ScheduleError, match=r"'stage1' \(index 0\).*lr_end.*allow_rise"):
        s.with_start_lr(1e-5)


# --------------------------------------------------------------------------- token strings


@pytest.mark.parametrize(
    "text, n",
    [
        ("20B", 20_000_000_000), ("1T", 10**12), ("512M", 512_000_000), ("64K", 64_000),
        ("1.5M", 1_500_000), ("0.5B", 500_000_000), (" 2 b ", 2_000_000_000), ("20G", 20 * 10**9),
        ("1_000", 1000), ("1e6", 1_000_000), ("1.5e3K", 1_500_000), ("123", 123),
        (1e6, 1_000_000), (7, 7), (2e13, 20 * 10**12), ("-5M", -5_000_000),
    ],
)
def test_parse_tokens(text, n):
    got = parse_tokens(text)
    assert got == n and type(got) is int


@pytest.mark.parametrize("bad", ["", "abc", "20X", "B", "1.5", "1.0005K", "nan", "inf", "1e-4K", 1.5,
                                 float("inf"), None, True, [1]])
def test_parse_tokens_rejects(bad):  # "1e-4K" is 0.1 tokens
    with pytest.raises(ScheduleError):
        parse_tokens(bad, "schedule.stage1.tokens")


def test_parse_tokens_error_names_the_field():
    with pytest.raises(ScheduleError, match=r"schedule\.stage1\.tokens.*'20X'.*K, M, B or T"):
        parse_tokens("20X", "schedule.stage1.tokens")


def test_format_tokens():
    assert format_tokens(20_000_000_000) == "20B"
    assert format_tokens(1_500_000) == "1.5M"
    assert format_tokens(10**13) == "10T"
    assert format_tokens(999) == "999"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "stages, name, index, field, hint",
    [
        ([Stage("warmup", 10, 1e-4), Stage("stable", 0, 1e-4, shape="constant")], "stable", 1, "tokens", "positive"),
        ([Stage("stage1", -5, 1e-4)], "stage1", 0, "tokens", "positive"),
        ([Stage("stage1", "lots", 1e-4)], "stage1", 0, "tokens", "suffix"),
        ([Stage("warmup", 10, 1e-4), Stage("decay", 10, 0.0, shape="exp")], "decay", 1, "shape", "1-sqrt"),
        ([Stage("stage1", 10, 0.0), Stage("stage1", 10, 0.0)], "stage1", 1, "name", "unique"),
        ([Stage("stage1", 10, -1e-5)], "stage1", 0, "lr_end", ">= 0"),
        ([Stage("stage1", 10, 0.0, lr_start=-1e-4)], "stage1", 0, "lr_start", ">= 0"),
        ([Stage("stage1", 10, float("nan"))], "stage1", 0, "lr_end", "finite"),
        ([Stage("stage1", 10, 1e-5, lr_start=3e-4), Stage("stage2", 10, 3e-5)], "stage2", 1, "lr_end", "allow_rise"),
        ([Stage("rewarm", 10, 3e-4)], "rewarm", 0, "lr_end", "allow_rise"),
        ([Stage("warmup", 10, 3e-4), Stage("stable", 10, 1e-4, shape="constant")], "stable", 1, "lr_end",
         "constant"),
    ],
)
def test_validation_errors_name_stage_index_and_field(stages, name, index, field, hint):
    with pytest.raises(ScheduleError) as ei:
        Schedule(stages)
    msg = str(ei.value)
    assert f"'{name}'" in msg and f"index {index}" in msg and f"'{field}'" in msg and hint in msg, msg
    assert "\n" not in msg


def test_rise_allowed_in_warmup_or_with_allow_rise():
    Schedule([Stage("warmup", 10, 3e-4)])
    s = Schedule([Stage("stage1", 10, 1e-5), Stage("rewarm", 10, 3e-4, allow_rise=True)], start_lr=3e-4)
    assert s.lr_at(20) == 3e-4
    Schedule([Stage("stage1", 10, 1e-5, lr_start=1e-5, shape="constant")])  # flat is not a rise


def test_empty_schedule_and_bad_start_lr():
    with pytest.raises(ScheduleError, match="no stages"):
        Schedule([])
    with pytest.raises(ScheduleError, match="start_lr"):
        Schedule([Stage("warmup", 10, 1e-4)], start_lr=-1.0)


def test_errors_are_value_errors():
    assert issubclass(ScheduleError, AnnealError) and issubclass(ScheduleError, ValueError)


# --------------------------------------------------------------------------- config


WSD_YAML = """
start_lr: 0.0
stages:
  - {name: warmup, tokens: 1e6, lr_end: 3e-4, shape: linear}
  - {name: stable, tokens: 20B, lr_end: 3e-4, shape: constant}
  - {name: stage1, tokens: 1T, lr_end: 3e-5}
  - {name: stage2, tokens: "200B", lr_end: 1e-5, shape: 1-sqrt}
"""


def test_from_config_omegaconf_list():
    s = Schedule.from_config(OmegaConf.create(WSD_YAML))
    assert s.stage_names == ["warmup", "stable", "stage1", "stage2"]
    assert [st.tokens for st in s.stages] == [10**6, 20 * 10**9, 10**12, 200 * 10**9]
    assert s.lr_at(0) == 0.0 and s.lr_at(10**6) == 3e-4
    assert s.lr_at(s.stage_end("stage1")) == 3e-5 and s.lr_at(s.total_tokens) == 1e-5
    assert Schedule.from_config(s.to_config()) == s  # round trip


def test_from_config_mapping_of_stages_allows_override_by_name():
    cfg = OmegaConf.create(
        {"start_lr": 3e-4, "stages": {"stage1": {"tokens": "1T", "lr_end": 3e-5}, "stage2": {"tokens": "200B", "lr_end": 1e-5}}}
    )
    cfg.merge_with_dotlist(["stages.stage1.tokens=20B"])  # what a Hydra override does
    s = Schedule.from_config(cfg)
    assert s == Schedule.dots1_anneal("20B", "200B")


def test_from_config_plain_dict_and_string_lrs():
    s = Schedule.from_config({"stages": [{"name": "warmup", "tokens": 100, "lr_end": "3e-4"}]})
    assert s.lr_at(100) == 3e-4


@pytest.mark.parametrize(
    "cfg, pattern",
    [
        ({"stages": [{"name": "stage1", "tokens": 10, "lr_ned": 1e-5}]}, r"'stage1' \(index 0\).*unknown field.*lr_ned"),
        ({"stages": [{"name": "stage1", "tokens": 10}]}, r"'stage1' \(index 0\).*'lr_end' is missing"),
        ({"stages": [{"name": "stage1", "tokens": "1Q", "lr_end": 0}]}, r"'stage1' \(index 0\).*'tokens'"),
        ({"stages": [{"name": "stage1", "tokens": 10, "lr_end": "fast"}]}, r"'stage1' \(index 0\).*'lr_end'.*number"),
        ({"stages": []}, "no stages"),
        ({"stage": []}, "unknown key"),
        ({"start_lr": 0.0}, "'stages' is missing"),
    ],
)
def test_from_config_errors(cfg, pattern):
    with pytest.raises(ScheduleError, match=pattern):
        Schedule.from_config(cfg)


# --------------------------------------------------------------------------- batch ramp


def test_batch_ramp_values():
    r = BatchRamp([(0, "64M"), ("2T", "96M"), ("6T", "128M")])
    assert r.batch_at(0) == 64_000_000
    assert r.batch_at(2 * 10**12 - 1) == 64_000_000
    assert r.batch_at(2 * 10**12) == 96_000_000  # a point's `from` belongs to the new batch
    assert r.batch_at(5.9e12) == 96_000_000
    assert r.batch_at(6 * 10**12) == 128_000_000
    assert r.batch_at(10**15) == 128_000_000
    assert r.points == [(0, 64_000_000), (2 * 10**12, 96_000_000), (6 * 10**12, 128_000_000)]


def test_batch_ramp_from_config():
    cfg = OmegaConf.create([{"from": "0", "batch_tokens": "64M"}, {"from": "2T", "batch_tokens": "96M"}])
    r = BatchRamp.from_config(cfg)
    assert r.batch_at(10**12) == 64_000_000 and r.batch_at(3 * 10**12) == 96_000_000
    assert BatchRamp.from_config(r.to_config()) == r
    assert BatchRamp.from_config(4096).points == [(0, 4096)]
    assert BatchRamp.from_config("4M") == BatchRamp.constant(4_000_000)
    assert BatchRamp.from_config([[0, 100], [1000, 200]]).batch_at(1000) == 200


@pytest.mark.parametrize(
    "points, pattern",
    [
        ([], "no points"),
        ([(0, "64M"), ("2T", "96M"), ("2T", "128M")], r"point 2: field 'from'.*greater"),
        ([(0, "64M"), ("2T", "96M"), ("1T", "128M")], r"point 2: field 'from'.*greater"),
        ([(0, 0)], r"point 0: field 'batch_tokens' must be > 0"),
        ([(0, 64), (10, -1)], r"point 1: field 'batch_tokens' must be > 0"),
        ([(100, 64)], r"point 0: field 'from' must be 0"),
        ([(0, "64Q")], r"point 0: field 'batch_tokens'"),
        ([(0,)], r"point 0: expected \(from_tokens, batch_tokens\)"),
    ],
)
def test_batch_ramp_validation(points, pattern):
    with pytest.raises(ScheduleError, match=pattern):
        BatchRamp(points)


def test_batch_ramp_config_errors():
    with pytest.raises(ScheduleError, match="unknown.*tokens"):
        BatchRamp.from_config([{"from": 0, "tokens": 64}])
    with pytest.raises(ScheduleError, match="missing.*batch_tokens"):
        BatchRamp.from_config([{"from": 0}])
    with pytest.raises(ScheduleError, match=">= 0"):
        BatchRamp.constant(64).batch_at(-1)


# --------------------------------------------------------------------------- plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_plot_schedule_writes_png(tmp_path):
    from anneal.train.plots import plot_schedule

    s = Schedule.from_config(OmegaConf.create(WSD_YAML))
    r = BatchRamp([(0, "64M"), ("5B", "96M"), ("10B", "128M")])
    out = plot_schedule(s, r, tmp_path / "sub" / "schedule.png", title="dots1 WSD")
    assert out == tmp_path / "sub" / "schedule.png" and _is_png(out)
    assert _is_png(plot_schedule(five_shapes(), None, tmp_path / "lr_only.png"))


def test_plot_losses_writes_png(tmp_path):
    import torch

    from anneal.train.plots import plot_losses

    history = []
    for i in range(50):
        row = {"tokens": i * 1_000_000, "loss": 4.0 / (1 + i), "lr": 3e-4}
        if i % 10 == 0:
            row.update({"eval_loss": 4.2 / (1 + i), "eval_loss/code": torch.tensor(3.9 / (1 + i)),
                        "eval_loss/web": float("nan") if i == 0 else 4.5 / (1 + i)})
        history.append(row)
    history.append({"loss": 1.0})  # no tokens: skipped
    out = plot_losses(history, tmp_path / "loss.png", schedule=Schedule.dots1_anneal("30M", "20M"))
    assert _is_png(out)
    assert _is_png(plot_losses([], tmp_path / "empty.png"))  # never fails at end of a run


# --------------------------------------------------------------------------- whole steps (issue 21)
def test_stages_are_rounded_to_whole_steps_so_each_ends_at_its_lr_end():
    from anneal.train.batch_ramp import BatchRamp
    from anneal.train.build import round_stages_to_steps

    sched = Schedule([Stage("stage1", 1000, 3e-5), Stage("stage2", 100, 1e-5), Stage("stage3", 1024, 5e-6)],
                     start_lr=3e-4)
    rounded = round_stages_to_steps(sched, BatchRamp.constant(512), seq_len=64)
    assert [st.tokens for st in rounded.stages] == [1024, 512, 1024]
    assert len(rounded.notes) == 2
    assert "stage stage1 (1K tokens) is not a whole number of 512-token batches" in rounded.notes[0]
    assert "stage stage2 (100 tokens) is shorter than one batch (512 tokens)" in rounded.notes[1]
    assert all("still ends at its lr_end" in n for n in rounded.notes)
    # the loop's steps start on the stage boundaries: the first step after each stage trains at its lr_end
    starts, t = [], 0
    while t < rounded.total_tokens:
        starts.append(t)
        t += 512
    for name in ("stage1", "stage2"):
        end = rounded.stage_end(name)
        assert end in starts and rounded.lr_at(end) == pytest.approx(rounded.stage(name).lr_end)
    # a batch ramp: whole steps of whatever batch applies where each step starts
    ramped = round_stages_to_steps(Schedule([Stage("s", 3000, 1e-5)], start_lr=1e-4),
                                   BatchRamp([(0, 512), (1024, 1024)]), seq_len=64)
    assert ramped.stages[0].tokens == 3072 and ramped.notes
    exact = round_stages_to_steps(Schedule([Stage("s", 2048, 1e-5)], start_lr=1e-4), BatchRamp.constant(512), 64)
    assert exact.stages[0].tokens == 2048 and exact.notes == ()
