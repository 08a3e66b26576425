"""Pipeline config: defaults, file and --set precedence, value parsing, errors, resolved copy, data paths."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from conftest import REPO

from sadpipe.config import DEFAULTS, ConfigError, apply_override, data_path, load_config, save_resolved

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
    cfg = copy.deepcopy(DEFAULTS)
    assert data_path(cfg, "train_images") is None                       # unset
    cfg["data"].update(root="/data/coco", train_images="train2017", val_images="/elsewhere/val",
                       train_annotations="~/ann.json")
    assert data_path(cfg, "train_images") == Path("/data/coco/train2017")
    assert data_path(cfg, "val_images") == Path("/elsewhere/val")        # absolute: root ignored
    assert data_path(cfg, "train_annotations") == Path.home() / "ann.json"
    cfg["data"]["root"] = ""
    assert data_path(cfg, "train_images") == Path("train2017")           # no root: relative to the cwd
    toy = load_config(TOY, ["data.root=/d"])
    assert data_path(toy, "unlabeled_annotations") == Path("/d/unlabeled/image_info.json")


def test_apply_override_returns_a_new_dict():
    cfg = load_config()
    out = apply_override(cfg, "teacher.train.seed=7")
    assert out["teacher"]["train"]["seed"] == 7 and cfg["teacher"]["train"]["seed"] == 0
