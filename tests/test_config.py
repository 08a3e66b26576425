"""Pipeline config: defaults, file and --set precedence, value parsing, errors, resolved copy, data paths."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from conftest import REPO

from sadpipe.config import DEFAULTS, ConfigError, apply_override, load_config, save_resolved, shipped_pipelines
from sadpipe.errors import UserError
from sadpipe.settings import DataConfig, load_settings, settings_from_dict

TOY = REPO / "pipelines" / "toy.toml"


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == DEFAULTS
    assert cfg["teacher"]["train"]["lr"] == 1e-3 and cfg["student"]["model"]["arch"] == "tiny"
    cfg["teacher"]["train"]["lr"] = 5.0  # a copy: the defaults stay untouched
    assert DEFAULTS["teacher"]["train"]["lr"] == 1e-3
    assert load_config()["teacher"]["train"]["lr"] == 1e-3


def test_file_then_set_precedence(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "mine"\n[teacher.train]\nlr = 0.02\nbatch_size = 4\n')
    cfg = load_config(path, ["teacher.train.lr=0.5"])
    assert cfg["teacher"]["train"]["lr"] == 0.5          # --set beats the file
    assert cfg["teacher"]["train"]["batch_size"] == 4    # the file beats the default (16)
    assert cfg["teacher"]["train"]["epochs"] == 1        # default where neither says anything
    assert cfg["student"]["train"]["lr"] == 1e-3         # only the named table changes
    assert cfg["name"] == "mine"
    # later --set wins over earlier
    assert load_config(path, ["teacher.train.lr=0.5", "teacher.train.lr=0.25"])["teacher"]["train"]["lr"] == 0.25


@pytest.mark.parametrize("assignment,key,expected", [
    ("teacher.train.batch_size=3", ("teacher", "train", "batch_size"), 3),
    ("teacher.train.lr=1e-2", ("teacher", "train", "lr"), 0.01),
    ("teacher.train.lr=2", ("teacher", "train", "lr"), 2.0),               # int into a float key
    ("teacher.train.hflip=false", ("teacher", "train", "hflip"), False),
    ("teacher.train.lr_milestones=[0.5, 0.75]", ("teacher", "train", "lr_milestones"), [0.5, 0.75]),
    ('dump.views=["orig","hflip"]', ("dump", "views"), ["orig", "hflip"]),
    ('teacher.model.arch="resnet34"', ("teacher", "model", "arch"), "resnet34"),
    ("teacher.model.arch=resnet34", ("teacher", "model", "arch"), "resnet34"),  # bare word
    ("data.root=/data/coco 2017", ("data", "root"), "/data/coco 2017"),
    ("data.root=2024", ("data", "root"), "2024"),                          # a folder named 2024, not a number
    ("data.root = 'C:\\data'", ("data", "root"), "C:\\data"),               # TOML literal string, spaces trimmed
    ("dump.codec.name=\"uniform_probability\"", ("dump", "codec"), {"name": "uniform_probability"}),
])
def test_set_value_parsing(assignment, key, expected):
    cfg = load_config(None, [assignment])
    node = cfg
    for k in key:
        node = node[k]
    assert node == expected and type(node) is type(expected)


def test_free_form_codec_table_from_a_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[dump.codec]\nname = "binned_probability"\nbins = 7\n')
    assert load_config(path)["dump"]["codec"] == {"name": "binned_probability", "bins": 7}
    # --set adds keys to the file's table one by one (a KD-grade cache: a lower floor)
    cfg = load_config(path, ["dump.codec.floor=0.003", "dump.codec.log_ratio=0.25"])
    assert cfg["dump"]["codec"] == {"name": "binned_probability", "bins": 7, "floor": 0.003, "log_ratio": 0.25}


@pytest.mark.parametrize("assignment,message", [
    ("teacher.train.lrr=1", r"unknown config key 'teacher\.train\.lrr'.*known keys here: .*\blr\b"),
    ("teacher.nope.x=1", r"unknown config key 'teacher\.nope'"),
    ("teacher.train=3", r"'teacher\.train' is a table"),
    ("teacher.train.batch_size=abc", r"'teacher\.train\.batch_size' expects an integer, got 'abc'"),
    ("teacher.train.batch_size=2.5", r"'teacher\.train\.batch_size' expects an integer"),
    ("teacher.train.hflip=1", r"'teacher\.train\.hflip' expects true or false"),
    ("teacher.train.lr=fast", r"'teacher\.train\.lr' expects a number"),
    ("dump.views=orig", r"'dump\.views' expects a list"),
    ("teacher.train.lr.x=1", r"'teacher\.train\.lr' expects a number"),
    ("teacher.train.lr", r"--set expects key=value"),
])
def test_bad_overrides_name_the_key(assignment, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TOY, [assignment])


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*absent\.toml"):
        load_config(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[teacher.train\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: invalid TOML"):
        load_config(broken)
    typo = tmp_path / "typo.toml"
    typo.write_text("[teacher.trian]\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"typo\.toml: unknown config key 'teacher\.trian'"):
        load_config(typo)
    wrong_kind = tmp_path / "kind.toml"
    wrong_kind.write_text('[data]\nroot = 3\n')
    with pytest.raises(ConfigError, match=r"kind\.toml: config key 'data\.root' expects a string"):
        load_config(wrong_kind)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TOY, ["teacher.train.lr=0.125", 'data.root="/x y/z"', "geometry.scales=[1.0, 1.2599210498948732]",
                            'dump.codec.name="uniform_probability"'])
    saved = save_resolved(cfg, tmp_path / "out")
    assert saved == tmp_path / "out" / "config.resolved.toml"
    again = load_config(saved)
    assert again == cfg
    assert again is not cfg and again["geometry"]["scales"][1] == 1.2599210498948732  # floats exact
    # the resolved file alone reproduces the run: loading it on top of the defaults changes nothing
    assert load_config(saved, []) == load_config(TOY, ["teacher.train.lr=0.125", 'data.root="/x y/z"',
                                                        "geometry.scales=[1.0, 1.2599210498948732]",
                                                        'dump.codec.name="uniform_probability"'])


def test_data_path_resolution(tmp_path):
    def data(**values):
        return DataConfig(**dict(DEFAULTS["data"], **values))

    assert data().path("train_images") is None                                    # unset
    coco = data(root="/data/coco", train_images="train2017", val_images="/elsewhere/val", train_annotations="~/ann.json")
    assert coco.path("train_images") == Path("/data/coco/train2017")
    assert coco.path("val_images") == Path("/elsewhere/val")                        # absolute: root ignored
    assert coco.path("train_annotations") == Path.home() / "ann.json"
    assert data(train_images="train2017").path("train_images") == Path("train2017")  # no root: relative to the cwd
    toy = load_settings(TOY, ["data.root=/d"])
    assert toy.data.path("unlabeled_annotations") == Path("/d/unlabeled/image_info.json")
    # the cache records images relative to the root; a path outside it stays whole
    assert coco.key_of("/data/coco/train2017/1.jpg") == "train2017/1.jpg"
    assert coco.key_of("/other/1.jpg") == "/other/1.jpg"


@pytest.mark.parametrize("override,key", [
    ('distill.method="ADL"', "distill.method"),
    ('distill.normalizer="fg"', "distill.normalizer"),
    ('distill.variant="mmdet"', "distill.variant"),
    ('distill.unlabeled_mix="mixed"', "distill.unlabeled_mix"),
    ('student.train.optimizer="adam"', "student.train.optimizer"),
    ('teacher.train.box_loss="l2"', "teacher.train.box_loss"),
    ('student.model.arch="resnet152"', "student.model.arch"),
    ('teacher.model.backbone_norm="gn"', "teacher.model.backbone_norm"),
    ('student.model.head_norm="batch"', "student.model.head_norm"),
    ("teacher.train.lr=0", "teacher.train.lr"),
    ("student.train.lr=-0.1", "student.train.lr"),
    ("student.train.batch_size=0", "student.train.batch_size"),
    ("teacher.train.momentum=1.5", "teacher.train.momentum"),
    ("student.train.lr_milestones=[0.5, 2.0]", "student.train.lr_milestones"),
    ("distill.temperature=0", "distill.temperature"),
    ("distill.pseudo_score_thresh=1.5", "distill.pseudo_score_thresh"),
    ("distill.hard_weight=-1", "distill.hard_weight"),
    ("distill.shard_window=-1", "distill.shard_window"),
    ('dump.views=["orig", "vflip"]', "dump.views"),
    ("dump.images_per_shard=0", "dump.images_per_shard"),
    ("detect.nms_thresh=2", "detect.nms_thresh"),
    ("data.tune_holdout=1.0", "data.tune_holdout"),
    ("student.model.tiny_widths=[8, 16]", "student.model.tiny_widths"),
])
def test_a_value_outside_what_sadpipe_accepts_is_a_one_line_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_settings(TOY, [override])
    message = str(info.value)
    assert message.startswith(f"{key} must be ") and "\n" not in message, message
    assert isinstance(info.value, UserError)


def test_the_shipped_pipelines_build_settings_that_mirror_the_dict():
    for name in shipped_pipelines():
        cfg = load_config(name)
        settings = settings_from_dict(cfg)
        assert settings.resolved is cfg
        assert settings.student.train.lr == cfg["student"]["train"]["lr"]
        assert settings.distill.method == cfg["distill"]["method"]
        assert list(settings.dump.views) == cfg["dump"]["views"]
        assert settings.geometry.preprocess.min_size == cfg["geometry"]["min_size"]


def test_apply_override_returns_a_new_dict():
    cfg = load_config()
    out = apply_override(cfg, "teacher.train.seed=7")
    assert out["teacher"]["train"]["seed"] == 7 and cfg["teacher"]["train"]["seed"] == 0
