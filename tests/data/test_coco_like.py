"""The COCO-like synthetic set (`make-toy-data --preset coco`): read back with pycocotools and by the COCO pipelines."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools.coco import COCO

from sadpipe.cli import main
from sadpipe.settings import load_settings
from sadpipe.data.coco import check_disjoint_ids
from sadpipe.data.coco_like import COCO_LIKE_SIZES, make_coco_like_dataset
from sadpipe.data.dataset import labeled_source, unlabeled_source
from sadpipe.data.toy import make_toy_dataset

REPO = Path(__file__).resolve().parents[2]
SMALL = {"n_train": 5, "n_val": 3, "n_unlabeled": 4}


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_like")
    summary = make_coco_like_dataset(root, seed=1, workers=1, **SMALL)
    return root, summary


def _torchvision_coco_names() -> list[str]:
    # an independent source of COCO's names: torchvision's 91-channel list, indexed by category id
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights
    return RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]


def test_layout_is_what_the_coco_pipelines_read(coco_like):
    root, summary = coco_like
    names = {p.name for p in root.iterdir()}
    assert names == {"train2017", "val2017", "unlabeled2017", "annotations", "coco_like_dataset.json"}
    assert {p.name for p in (root / "annotations").iterdir()} == {
        "instances_train2017.json", "instances_val2017.json", "image_info_unlabeled2017.json"}
    for pipeline in ("coco_sad_r50.toml", "coco_r101_teacher.toml"):
        cfg = load_settings(REPO / "pipelines" / pipeline, [f"data.root={json.dumps(str(root))}"])
        train, val = labeled_source(cfg.data, "train"), labeled_source(cfg.data, "val")
        unlabeled = unlabeled_source(cfg.data)
        assert (len(train), len(val), len(unlabeled)) == (5, 3, 4)
        assert train.categories.num_classes == 80 and unlabeled.categories == train.categories
        check_disjoint_ids(train, val, unlabeled)
        assert train.stats["boxes_clipped"] == 0 and train.stats["boxes_dropped_degenerate"] == 0
    assert json.loads((root / "coco_like_dataset.json").read_text()) == {k: v for k, v in summary.items()
                                                                           if k != "out_dir"}


def test_pycocotools_reads_coco_ids_names_and_sizes(coco_like):
    root, summary = coco_like
    tv_names = _torchvision_coco_names()
    objects = {}
    for split, images_dir, ann in (("train", "train2017", "instances_train2017.json"),
                                   ("val", "val2017", "instances_val2017.json")):
        coco = COCO(str(root / "annotations" / ann))
        cat_ids = coco.getCatIds()
        assert len(cat_ids) == 80
        # COCO's ids: 1..90 without the 10 unused ones; names as torchvision lists them by id
        assert set(cat_ids) == set(range(1, 91)) - {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
        assert all(cat["name"] == tv_names[cat["id"]] for cat in coco.loadCats(cat_ids))
        assert coco.loadCats(1)[0]["supercategory"] == "person" and coco.loadCats(90)[0]["name"] == "toothbrush"
        sizes = Counter()
        for image in coco.loadImgs(coco.getImgIds()):
            with Image.open(root / images_dir / image["file_name"]) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert im.size == (image["width"], image["height"])
            assert image["file_name"] == f"{image['id']:012d}.jpg"
            sizes[(image["width"], image["height"])] += 1
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            assert len(anns) <= 6
            for a in anns:
                x, y, w, h = a["bbox"]
                assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"]
                assert w >= 1 and h >= 1 and a["area"] <= w * h and a["category_id"] in cat_ids
        objects[split] = len(coco.getAnnIds())
        # image i has COCO_LIKE_SIZES[i % 4]: 640x480 twice per cycle, 480x640 and 500x375 once
        n = len(coco.getImgIds())
        assert sizes == Counter(COCO_LIKE_SIZES[i % 4] for i in range(n))
    assert objects == {k: v for k, v in summary["objects"].items() if k != "unlabeled"}
    # objects are big enough to be COCO objects at this size: the toy's 12-56 px scaled by min side / 128
    train = COCO(str(root / "annotations" / "instances_train2017.json"))
    longest = max(max(a["bbox"][2:]) for a in train.loadAnns(train.getAnnIds()))
    assert longest > 56


def test_unlabeled_image_info_has_no_annotations(coco_like):
    root, summary = coco_like
    raw = json.loads((root / "annotations" / "image_info_unlabeled2017.json").read_text())
    assert "annotations" not in raw and len(raw["images"]) == 4
    info = COCO(str(root / "annotations" / "image_info_unlabeled2017.json"))
    assert len(info.getImgIds()) == 4 and len(info.getCatIds()) == 80 and not info.anns
    for image in info.loadImgs(info.getImgIds()):
        with Image.open(root / "unlabeled2017" / image["file_name"]) as im:
            assert im.size == (image["width"], image["height"])
        assert 200_001 <= image["id"] < 300_000


def test_deterministic_and_independent_of_workers(coco_like, tmp_path):
    root, _ = coco_like
    again = tmp_path / "again"
    make_coco_like_dataset(again, seed=1, workers=2, **SMALL)
    assert _file_bytes(again) == _file_bytes(root)
    other = tmp_path / "other"
    make_coco_like_dataset(other, seed=2, workers=1, **SMALL)
    first = "train2017/000000000001.jpg"
    assert _file_bytes(other)[first] != _file_bytes(root)[first]
    # labels cover more than the toy's six categories
    cats = {a["category_id"] for a in json.loads((root / "annotations/instances_train2017.json").read_text())
            ["annotations"]}
    assert len(cats) > 6


def test_refuses_a_real_coco_root_and_replaces_its_own(tmp_path):
    real = tmp_path / "coco"
    (real / "train2017").mkdir(parents=True)
    (real / "train2017" / "000000000009.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not a COCO-like dataset made by sadpipe"):
        make_coco_like_dataset(real, n_train=1, n_val=1, n_unlabeled=1, workers=1)
    assert (real / "train2017" / "000000000009.jpg").read_bytes() == b"precious"

    ours = tmp_path / "ours"
    make_coco_like_dataset(ours, n_train=3, n_val=1, n_unlabeled=1, workers=1)
    make_coco_like_dataset(ours, n_train=1, n_val=1, n_unlabeled=1, workers=1)
    assert len(list((ours / "train2017").iterdir())) == 1
    assert not (ours / ".coco_like_in_progress").exists()


def test_cli_presets(tmp_path):
    runner = CliRunner()
    out = tmp_path / "coco"
    result = runner.invoke(main, ["make-toy-data", str(out), "--preset", "coco", "--train", "2", "--val", "1",
                                  "--unlabeled", "1", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"] == {"train": 2, "val": 1, "unlabeled": 1}
    reference = tmp_path / "reference"
    make_coco_like_dataset(reference, seed=3, n_train=2, n_val=1, n_unlabeled=1, workers=1)
    assert _file_bytes(out) == _file_bytes(reference)

    # the default preset is the toy set; counts pass through
    toy = tmp_path / "toy"
    result = runner.invoke(main, ["make-toy-data", str(toy), "--train", "2", "--val", "1", "--unlabeled", "1"])
    assert result.exit_code == 0, result.output
    toy_reference = tmp_path / "toy_reference"
    make_toy_dataset(toy_reference, seed=0, n_train=2, n_val=1, n_unlabeled=1, workers=1)
    assert _file_bytes(toy) == _file_bytes(toy_reference)
    with Image.open(toy / "train/images/000000000001.png") as im:
        assert np.asarray(im).shape == (128, 128, 3)

    bad = runner.invoke(main, ["make-toy-data", str(tmp_path / "bad"), "--preset", "coco", "--train", "-1"])
    assert bad.exit_code == 2 and "n_train must be an integer" in bad.output
