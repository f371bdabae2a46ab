"""Ranking and summarising sweep jobs, naming the parent run, and what a config hash leaves out."""

from __future__ import annotations

from pathlib import Path

from cnnrun.context import RunContext
from cnnrun.sweep.objective import rank
from cnnrun.sweep.parent import plugin_name, sweep_name
from cnnrun.sweep.state import JobRecord, SweepState, read_records, write_record
from cnnrun.sweep.summary import Row, Summary, one_line


def summary(direction="maximize") -> Summary:
    rows = [
        Row(0, ["trainer.epochs=1", "optimizer.lr=0.001"], "FINISHED", 0.90, "a" * 32),
        Row(1, ["trainer.epochs=1", "optimizer.lr=0.01"], "FAILED", None, "b" * 32, "training diverged\n  at step 3"),
        Row(2, ["trainer.epochs=1", "optimizer.lr=0.003"], "SKIPPED", 0.95, "c" * 32),
        Row(3, ["trainer.epochs=1", "optimizer.lr=0.0003"], "FINISHED", 0.80, "d" * 32),
    ]
    state = SweepState("p" * 32, "sqlite:///m.db", "cnnrun", direction=direction, experiment_id="7")
    return Summary(state, rows, Path("/tmp/sweep"))


def test_jobs_rank_best_first_failures_last():
    assert [r.num for r in summary().ranked()] == [2, 0, 3, 1]
    assert [r.num for r in summary("minimize").ranked()] == [3, 0, 2, 1]
    assert summary().best().num == 2
    assert rank([3.0, float("nan"), None, 5.0], lambda v: v, "maximize")[:2] == [5.0, 3.0]


def test_counts_varying_overrides_and_texts():
    s = summary()
    assert s.counts() == {"total": 4, "finished": 2, "skipped": 1, "failed": 1, "killed": 0}
    assert s.varying(s.rows[0]) == "optimizer.lr=0.001"  # trainer.epochs=1 is shared by every job
    markdown = s.markdown()
    assert "| 2 | optimizer.lr=0.003 | SKIPPED | 0.9500 |" in markdown
    assert "[cccccccc](#/experiments/7/runs/" + "c" * 32 + ")" in markdown
    assert "training diverged at step 3" in markdown  # one line per cell
    assert s.csv().splitlines()[0] == "job,overrides,status,kept_val_acc,test_acc,run,error"
    assert s.errors() == ["job 1 FAILED: training diverged at step 3"]
    assert one_line("x" * 400).endswith("…") and len(one_line("x" * 400)) == 300


def test_parent_run_names():
    assert sweep_name(Path("/w/multirun/2024-05-01/12-30-00")) == "sweep-2024-05-01-12-30-00"
    assert sweep_name(Path("/w/multirun/study1")) == "sweep-study1"
    assert plugin_name("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper") == "optuna"
    assert plugin_name("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher") == "joblib"


def test_job_records_round_trip(tmp_path):
    write_record(tmp_path, JobRecord(3, ["a=1"], "FINISHED", 0.5, "r"))
    write_record(tmp_path, JobRecord(1, ["a=2"], "FAILED", error="boom"))
    assert [(r.num, r.status) for r in read_records(tmp_path)] == [(1, "FAILED"), (3, "FINISHED")]


def test_config_hash_ignores_what_differs_between_identical_jobs():
    base = {"model": {"name": "m"}, "optimizer": {"lr": 0.001},
            "device": {"name": "auto", "index": None, "threads": None},
            "trainer": {"epochs": 2, "progress": True}, "tracking": {"uri": "a"}, "sweep": {"rerun": False},
            "predict": {"top_k": None}, "export": {"format": "onnx"}}

    def digest(**changes):
        raw = {k: dict(v) for k, v in base.items()}
        for key, value in changes.items():
            group, name = key.split("__")
            raw[group][name] = value
        return RunContext(cfg=None, raw=raw, output_dir=Path(".")).config_hash()

    same = digest()
    assert digest(device__threads=1) == digest(device__index=3) == digest(trainer__progress=False) == same
    assert digest(tracking__uri="http://x") == digest(sweep__rerun=True) == same
    assert digest(predict__top_k=3) == same  # task=predict's settings: no part of what training computes
    assert digest(export__format="keras") == same  # task=export's settings change nothing a training run computes
    assert digest(optimizer__lr=0.003) != same and digest(trainer__epochs=3) != same
    assert digest(device__name="cpu") != same
