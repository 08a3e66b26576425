"""`store_fidelity`: a store against its teacher run live; a store damaged through zarr
(checksums still valid, so verify passes) must look clearly worse."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from conftest import make_spread_teacher

from sadpipe.cache.format import StoreMismatchError
from sadpipe.cache.store_report import verify_store
from sadpipe.cache.live_fidelity import FRESH_STUDENT, format_fidelity, store_fidelity
from sadpipe.cache.reader import TeacherCache
from sadpipe.data.dataset import labeled_source
from sadpipe.tasks.dump import dump_teacher
from sadpipe.models import save_checkpoint
from sadpipe.tasks.supervised import build_model_for


_teacher = make_spread_teacher


@pytest.fixture(scope="module")
def dumped(tmp_path_factory, toy_root):
    from conftest import REPO, tiny_overrides
    from sadpipe.settings import load_settings

    base = tmp_path_factory.mktemp("live")
    cfg = load_settings(REPO / "pipelines" / "toy.toml", tiny_overrides(toy_root) + ['dump.views=["orig"]'])
    teacher = _teacher(cfg, base / "teacher.pt")
    store = base / "c.zarr"
    dump_teacher(cfg, teacher, store, device="cpu", log=lambda *a: None)
    return cfg, teacher, store


def test_faithful_store_and_sample_from_both_splits(dumped):
    cfg, teacher, store = dumped
    d = store_fidelity(store, teacher, cfg, images=6, seed=3)
    cache = TeacherCache(store)
    # 6 images: 3 labeled + 3 unlabeled, distinct, all ok
    assert len(set(d["image_ids"])) == 6
    assert sum(cache.split_of(i) == "labeled" for i in d["image_ids"]) == 3
    v = d["views"]["orig"]
    assert v["entries"] == 6 * 3069 * 6  # 128x128 images: 3069 anchors, 6 classes
    assert v["code_mismatch_fraction"] <= 1e-4
    assert set(v["students"][FRESH_STUDENT]) == {"adl", "kd", "weighted_ce"}
    s = v["students"][FRESH_STUDENT]["adl"]
    assert s["grad_cosine"] > 0.999 and s["worst_image_grad_cosine"] > 0.99
    assert s["loss_rel_error"] < 0.02
    # the decoded q sits in the stored code's bin: error at most the widest bin (the 0.02 background bin)
    lo, hi = cache.codec.bin_bounds_q()
    assert 0 < v["max_abs_q_error"] <= (hi - lo).max()
    assert v["bits_per_value"] > 0
    text = format_fidelity(d)
    assert "orig" in text and FRESH_STUDENT in text
    # the same seed gives the same sample; another seed another one
    assert store_fidelity(store, teacher, cfg, images=6, seed=3)["image_ids"] == d["image_ids"]
    assert store_fidelity(store, teacher, cfg, images=6, seed=4)["image_ids"] != d["image_ids"]


def test_codes_zeroed_through_zarr_pass_verify_but_not_fidelity(dumped, tmp_path):
    cfg, teacher, store = dumped
    clean = store_fidelity(store, teacher, cfg, images=4, seed=0)
    victim = clean["image_ids"][0]
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store, damaged)
    # every code of the victim's record set to 0 (background), its entry positions kept
    i = TeacherCache(damaged).index_of(victim)
    arr = zarr.open_group(damaged, mode="r+")["views/orig/targets"]
    blob = arr[i : i + 1][0]
    m = TeacherCache(damaged).get_compact(victim).num_entries
    arr[i : i + 1] = np.array([blob[: len(blob) - m] + bytes(m)], dtype=object)  # the codes are the last m bytes (sparse and dense alike)
    assert verify_store(damaged).ok  # zarr rewrote the checksum: verify cannot see it
    d = store_fidelity(damaged, teacher, cfg, images=4, seed=0)
    assert d["image_ids"] == clean["image_ids"]
    v, c = d["views"]["orig"], clean["views"]["orig"]
    # one image of 4 lost all its codes above background: a quarter-ish of entries are off
    assert v["code_mismatch_fraction"] > 0.05 > c["code_mismatch_fraction"]
    s, sc = v["students"][FRESH_STUDENT]["adl"], c["students"][FRESH_STUDENT]["adl"]
    assert s["grad_cosine"] < sc["grad_cosine"] - 0.01
    assert s["worst_image_id"] == victim and s["worst_image_grad_cosine"] < 0.9


def test_other_teacher_and_trained_student(dumped, tmp_path):
    cfg, teacher, store = dumped
    other = _teacher(cfg, tmp_path / "other.pt", seed=1)
    with pytest.raises(StoreMismatchError, match="not the teacher"):
        store_fidelity(store, other, cfg, images=2)
    torch.manual_seed(5)
    student = build_model_for(cfg, "student", labeled_source(cfg.data, "train").categories)
    path = save_checkpoint(tmp_path / "student.pt", student)
    d = store_fidelity(store, teacher, None, images=2, student_path=path)
    assert set(d["views"]["orig"]["students"]) == {FRESH_STUDENT, "student.pt"}
    assert d["views"]["orig"]["students"]["student.pt"]["adl"]["grad_cosine"] > 0.99
