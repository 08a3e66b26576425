"""benchmarks/toy_distillation.py keeps a record per finished run so a benchmark of many CPU hours
survives the loss of its run directories; these tests check the record's round trip, its
refusal of another teacher's records, and the teacher digest it relies on."""

import json

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("toy_distillation")


def fake_run_dir(run, data_root: str) -> dict:
    """A finished run as train-student leaves it: metrics.jsonl with periodic evals, eval.json, config."""
    run.dir.mkdir(parents=True)
    lines = [{"step": 10, "loss": 1.0}, {"step": 20, "eval": {"AP": 0.25}}, {"step": 40, "loss": 0.5}]
    (run.dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run.dir / "eval.json").write_text(json.dumps({"metrics": {"AP": 0.375, "AP50": 0.5}}))
    (run.dir / "config.resolved.toml").write_text(f'[data]\nroot = "{data_root}"\n')
    # the curve: the periodic eval (20, 0.25), then the final one at the last logged step (40, 0.375)
    return {"method": "plain KD", "label": "", "seed": 1, "metrics": {"AP": 0.375, "AP50": 0.5},
            "curve": [[20, 0.25], [40, 0.375]]}


def test_record_outlives_the_run_directory(bench, tmp_path):
    work, results, data_root = tmp_path / "work", tmp_path / "results", str(tmp_path / "machine" / "toy")
    run = bench.Run(work, "plain KD", 1, ['distill.method="kd"'], results=results)
    expected = fake_run_dir(run, data_root)
    assert run.done and run.trained
    prov = {"teacher_weights_sha256": "a" * 64, "data_sha256": "b" * 64}
    run.write_record(prov, ["python", "-m", "sadpipe", "train-student", "--out", str(run.dir)],
                     {data_root: "DATA", str(work): "WORKDIR"})

    import shutil
    shutil.rmtree(work)  # a new machine: the run directory is gone, the committed record is not
    again = bench.Run(work, "plain KD", 1, ['distill.method="kd"'], results=results)
    assert again.done and not again.trained
    got = again.result()
    assert got["metrics"] == expected["metrics"] and [list(p) for p in got["curve"]] == expected["curve"]
    text = again.record.read_text()
    assert str(tmp_path) not in text  # this machine's paths are replaced by names
    rec = json.loads(text)
    assert 'root = "DATA"' in rec["config_resolved"] and "--out WORKDIR/table/plain_kd_seed1" in rec["command"]
    again.check_record(prov)  # the same teacher and data: accepted
    with pytest.raises(SystemExit, match="teacher_weights_sha256"):
        again.check_record({**prov, "teacher_weights_sha256": "c" * 64})


def test_unfinished_run_writes_no_record(bench, tmp_path):
    run = bench.Run(tmp_path / "work", "ADL (labeled)", 0, [], results=tmp_path / "results")
    run.dir.mkdir(parents=True)  # started, never finished (no eval.json)
    run.write_record({"teacher_weights_sha256": "a"}, ["x"], {})
    assert not run.record.exists() and not run.done


def test_weights_digest_depends_on_weights_not_on_the_file(bench, tmp_path):
    # a 0-d integer tensor too, as BatchNorm's num_batches_tracked
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3), "n": torch.tensor(3)}
    torch.save({"model": state, "extra": {"out": "runs/a"}}, tmp_path / "a.pt")
    torch.save({"extra": {"out": "elsewhere/b", "step": 7}, "model": dict(reversed(state.items()))}, tmp_path / "b.pt")
    assert bench.weights_digest(tmp_path / "a.pt") == bench.weights_digest(tmp_path / "b.pt")
    changed = {**state, "b": torch.tensor([0.0, 0.0, 1e-7])}
    torch.save({"model": changed}, tmp_path / "c.pt")
    assert bench.weights_digest(tmp_path / "c.pt") != bench.weights_digest(tmp_path / "a.pt")


def test_method_set_splits_after_the_method_name(bench):
    # method names may contain a colon; the value may too (a path)
    assert bench.parse_method_set("Chen: weighted soft CE:distill.hard_weight=0.5") == (
        "Chen: weighted soft CE", "distill.hard_weight=0.5")
    assert bench.parse_method_set("ADL:distill.loss_weight=8") == ("ADL", "distill.loss_weight=8")
    assert bench.parse_method_set('SAD:distill.online_teacher="s3://b/t.pt"') == (
        "SAD", 'distill.online_teacher="s3://b/t.pt"')
    with pytest.raises(SystemExit, match="METHOD:KEY=VALUE"):
        bench.parse_method_set("ADL loss_weight=8")


def result(method: str, seed: int, ap: float, label: str = "") -> dict:
    return {"method": method, "label": label, "seed": seed, "metrics": {"AP": ap, "AP50": ap + 0.2}}


def test_table_pairs_by_seed_not_by_position(bench):
    # student alone 0.60 / 0.64 on seeds 0 / 1; KD has seed 1 first in the list, 0.66 then 0.61.
    # Paired: seed 0 61 - 60 = +1, seed 1 66 - 64 = +2 -> mean 1.50, std sqrt(((1-1.5)^2 + (2-1.5)^2) / 1) = 0.71.
    # Mean KD mAP (61 + 66) / 2 = 63.50 -> 63.50 / 70 = 91 % of a 70-mAP teacher.
    rows = [result("student alone", 0, 0.60), result("student alone", 1, 0.64),
            result("plain KD", 1, 0.66, "loss_weight=2"), result("plain KD", 0, 0.61, "loss_weight=2")]
    text = bench.table(rows, 70.0)
    kd = next(line for line in text.splitlines() if line.startswith("| plain KD"))
    # AP50 is AP + 0.2 in these records, so its paired differences are the same: 1.50 +- 0.71
    assert kd == ("| plain KD (loss_weight=2) | 2 | 63.50 +- 3.54 | 83.50 +- 3.54 | 1.50 +- 0.71 (every seed) "
                  "| 1.50 +- 0.71 (every seed) | 91 % |")
    assert "No student-alone run" not in text
    # mixed signs get no mark: ADL - none = 62 - 60 = +2 on seed 0, 63 - 64 = -1 on seed 1 -> 0.50 +- 2.12
    rows += [result("ADL (labeled)", 0, 0.62), result("ADL (labeled)", 1, 0.63)]
    assert "| 0.50 +- 2.12 | " in bench.table(rows, 70.0)


def test_table_says_why_the_paired_column_is_empty(bench):
    text = bench.table([result("plain KD", 0, 0.61)], None)
    assert "| plain KD | 1 | 61.00 | 81.00 | - | - | - |" in text
    assert "No student-alone run in this results directory" in text


def test_claims_hold_only_when_every_seed_agrees(bench):
    # SAD - ADL per seed: 66 - 62 = +4, 65 - 66 = -1 -> mean 1.50, not every seed -> "no".
    # KD - none per seed: 63 - 62 = +1, 64 - 63 = +1 -> 1.00 +- 0.00, every seed -> "yes".
    # SAD against a 70-mAP teacher: 66 - 70 = -4, 65 - 70 = -5 -> -4.50 +- 0.71, "no".
    rows = [result("student alone", 0, 0.62), result("student alone", 1, 0.63),
            result("plain KD", 0, 0.63), result("plain KD", 1, 0.64),
            result("ADL (labeled)", 0, 0.62), result("ADL (labeled)", 1, 0.66),
            result("SAD (labeled + unlabeled)", 0, 0.66), result("SAD (labeled + unlabeled)", 1, 0.65)]
    lines = bench.claims_table(rows, 70.0).splitlines()
    assert "| KD > none | 2 | 1.00 +- 0.00 | yes |" in lines
    assert "| SAD > ADL | 2 | 1.50 +- 3.54 | no |" in lines
    assert "| SAD (labeled + unlabeled) student >= teacher (70.00) | 2 | -4.50 +- 0.71 | no |" in lines
    # no data distillation run: its claims are left out rather than shown empty
    assert not any("data distillation" in line for line in lines)


def test_online_minus_cached_is_paired_by_seed(bench):
    # online - cached: seed 0 63 - 64 = -1, seed 2 65 - 62 = +3 -> 1.00 +- 2.83; the cached seed 1
    # has no online partner, so it counts only in the cached std: std(64, 60, 62) = 2.00.
    rows = [result("plain KD", 0, 0.64), result("plain KD", 1, 0.60), result("plain KD", 2, 0.62),
            result("plain KD, online teacher", 0, 0.63), result("plain KD, online teacher", 2, 0.65)]
    assert "| plain KD | 2 | 1.00 +- 2.83 | 2.00 |" in bench.online_table(rows).splitlines()


def test_self_distillation_is_compared_with_the_same_network_alone(bench, tmp_path):
    # both same-size methods take the teacher's model table from its checkpoint
    ckpt = tmp_path / "teacher.pt"
    torch.save({"spec": {"arch": "resnet18", "fpn_channels": 64, "head_norm": "group", "backbone_norm": "frozen_bn"},
                "model": {}}, ckpt)
    assert bench.teacher_model_overrides(ckpt) == [
        'student.model.arch="resnet18"', "student.model.fpn_channels=64",
        'student.model.head_norm="group"', 'student.model.backbone_norm="frozen_bn"']
    assert bench.METHODS["teacher arch alone"] == ['distill.method="none"', "SELF"]
    # self-distillation - same network alone per seed: 70 - 68 = +2, 69 - 69 = 0 -> 1.00 +- 1.41, "no";
    # against a 75-mAP teacher: 70 - 75 = -5, 69 - 75 = -6 -> -5.50 +- 0.71
    rows = [result("teacher arch alone", 0, 0.68), result("teacher arch alone", 1, 0.69),
            result("self-distillation (teacher arch, SAD)", 0, 0.70),
            result("self-distillation (teacher arch, SAD)", 1, 0.69)]
    lines = bench.claims_table(rows, 75.0).splitlines()
    assert "| self-distillation > teacher arch alone | 2 | 1.00 +- 1.41 | no |" in lines
    assert "| self-distillation (teacher arch, SAD) student >= teacher (75.00) | 2 | -5.50 +- 0.71 | no |" in lines


def test_table_pairs_ap50_on_its_own(bench):
    # flat mAP, a loose-IoU gain: AP 0.60 for both on seeds 0 and 1; AP50 0.80 / 0.82 alone,
    # 0.84 / 0.87 distilled -> AP50 paired +4, +5 -> 4.50 +- 0.71, every seed; mAP paired 0.00 +- 0.00
    rows = [result("student alone", 0, 0.60), result("student alone", 1, 0.60),
            result("SAD (labeled + unlabeled)", 0, 0.60), result("SAD (labeled + unlabeled)", 1, 0.60)]
    for r, ap50 in zip(rows, (0.80, 0.82, 0.84, 0.87)):
        r["metrics"]["AP50"] = ap50
    line = next(x for x in bench.table(rows, None).splitlines() if x.startswith("| SAD"))
    assert line == "| SAD (labeled + unlabeled) | 2 | 60.00 +- 0.00 | 85.50 +- 2.12 | 0.00 +- 0.00 | 4.50 +- 0.71 (every seed) | - |"
