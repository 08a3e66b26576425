"""The demo end to end, shrunk by overrides: every stage runs, the report holds the runs' own numbers."""

import json

import pytest
from click.testing import CliRunner

from sadpipe.cli import main

SHRINK = ['teacher.model.arch="tiny"', "teacher.model.fpn_channels=32", "teacher.model.tiny_widths=[16,32,64,128]",
          "teacher.train.max_steps=3", "student.train.max_steps=4", "teacher.train.num_workers=0",
          "student.train.num_workers=0", "dump.num_workers=0"]


@pytest.mark.slow
def test_demo_runs_every_stage_and_resumes(tmp_path):
    work = tmp_path / "demo"
    args = ["demo", "--workdir", str(work), "--device", "cpu"] + [a for s in SHRINK for a in ("--set", s)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for stage in ("data", "teacher", "cache", "student_alone", "student_sad"):
        assert (work / stage / ".done").is_file(), stage
    # the table in report.md carries each run's own mAP from its eval.json (x100, one decimal)
    report = (work / "report.md").read_text()
    for run in ("teacher", "student_alone", "student_sad"):
        ap = json.loads((work / run / "eval.json").read_text())["metrics"]["AP"]
        assert f"{ap * 100:.1f}" in report
    assert (work / "map.png").stat().st_size > 0 and (work / "losses.png").stat().st_size > 0
    # the SAD student read the cache: its log has a distillation term; the student alone's has none
    sad_log = [json.loads(l) for l in (work / "student_sad" / "metrics.jsonl").read_text().splitlines()]
    alone_log = [json.loads(l) for l in (work / "student_alone" / "metrics.jsonl").read_text().splitlines()]
    assert all("distill" in r for r in sad_log) and not any("distill" in r for r in alone_log)
    # a rerun skips every finished stage
    again = CliRunner().invoke(main, args, catch_exceptions=False)
    assert again.exit_code == 0
    assert again.output.count("done already") == 5
