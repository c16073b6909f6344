"""``dvml.extract.datasets``: the official index formats, the paper's zero-shot splits, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from dvml.errors import DvmlError
from dvml.extract.datasets import DatasetName, read_dataset


def _assert_zero_shot(index):
    train, test = {s.label for s in index.train}, {s.label for s in index.test}
    assert train and test and not train & test
    for s in index.train + index.test:
        assert (index.root / s.path).is_file(), s.path


def test_cub_against_its_index_files(tiny_cub):
    index = read_dataset("cub", tiny_cub)
    _assert_zero_shot(index)
    # an independent reading of the two files, joined by image id
    paths = dict(line.split() for line in (tiny_cub / "images.txt").read_text().split("\n") if line)
    labels = dict(line.split() for line in (tiny_cub / "image_class_labels.txt").read_text().split("\n") if line)
    expected = [(f"images/{paths[i]}", int(labels[i])) for i in sorted(paths, key=int)]
    assert [tuple(s) for s in index.train + index.test] == expected
    assert {s.label for s in index.train} == {1, 2, 3} and {s.label for s in index.test} == {101, 102, 103}
    assert index.class_names[101] == "101.Bird_101"


def test_cars196_reads_the_savemat_struct_and_splits_at_98(tiny_cars196):
    import scipy.io

    index = read_dataset(DatasetName.cars196, tiny_cars196)
    _assert_zero_shot(index)
    ann = scipy.io.loadmat(tiny_cars196 / "cars_annos.mat")["annotations"][0]
    expected = [(str(a["relative_im_path"][0]), int(a["class"][0, 0])) for a in ann]
    assert [tuple(s) for s in index.train + index.test] == expected  # all train rows come first here
    assert max(s.label for s in index.train) <= 98 < min(s.label for s in index.test)


def test_sop_uses_the_two_ebay_files(tiny_sop):
    index = read_dataset("sop", tiny_sop)
    _assert_zero_shot(index)
    rows = [line.split() for line in (tiny_sop / "Ebay_test.txt").read_text().split("\n")[1:] if line]
    assert [tuple(s) for s in index.test] == [(r[3], int(r[1])) for r in rows]


def test_folder_splits_sorted_classes_in_half_or_as_told(tiny_folder):
    index = read_dataset("folder", tiny_folder)
    _assert_zero_shot(index)
    assert [index.class_names[k] for k in sorted(index.class_names)] == ["ant", "bee", "cat", "dog"]
    assert {s.label for s in index.train} == {0, 1}
    assert any(s.path.endswith(".png") for s in index.train + index.test)
    three = read_dataset("folder", tiny_folder, train_classes=3)
    assert {s.label for s in three.train} == {0, 1, 2} and {s.label for s in three.test} == {3}
    with pytest.raises(DvmlError, match="^train_classes 4: must be between 1 and 3 "):
        read_dataset("folder", tiny_folder, train_classes=4)
    with pytest.raises(DvmlError, match="folder dataset only"):
        read_dataset("cub", tiny_folder, train_classes=2)


@pytest.mark.parametrize(("fixture", "name", "remove", "hint"), [
    ("tiny_cub", "cub", "images.txt", "CUB_200_2011"),
    ("tiny_cub", "cub", "image_class_labels.txt", "CUB_200_2011"),
    ("tiny_cars196", "cars196", "cars_annos.mat", "cars_annos.mat and car_ims"),
    ("tiny_sop", "sop", "Ebay_test.txt", "Stanford_Online_Products"),
])
def test_missing_index_file_is_named(request, fixture, name, remove, hint):
    root = request.getfixturevalue(fixture)
    (root / remove).unlink()
    with pytest.raises(DvmlError) as err:
        read_dataset(name, root)
    assert str(root / remove) in str(err.value) and "not found" in str(err.value) and hint in str(err.value)


@pytest.mark.parametrize("name", [n.value for n in DatasetName])
def test_missing_root_is_named(tmp_path, name):
    with pytest.raises(DvmlError, match=f"{tmp_path / 'nope'}: not found"):
        read_dataset(name, tmp_path / "nope")


def test_malformed_rows_name_file_and_line(tiny_cub, tiny_sop, tiny_cars196):
    labels = tiny_cub / "image_class_labels.txt"
    lines = labels.read_text().split("\n")
    lines[2] = "3 bird"
    labels.write_text("\n".join(lines))
    with pytest.raises(DvmlError, match=r"image_class_labels.txt:3: class id must be an integer"):
        read_dataset("cub", tiny_cub)
    train = tiny_sop / "Ebay_train.txt"
    train.write_text("id class path\n" + train.read_text().split("\n", 1)[1])
    with pytest.raises(DvmlError, match=r"Ebay_train.txt: line 1 should be the header"):
        read_dataset("sop", tiny_sop)
    import scipy.io

    scipy.io.savemat(tiny_cars196 / "cars_annos.mat", {"annotations": np.zeros((1, 2), dtype=[("fname", object)])})
    with pytest.raises(DvmlError, match=r"cars_annos.mat: 'annotations' has no field 'relative_im_path'"):
        read_dataset("cars196", tiny_cars196)


def test_a_split_without_classes_is_refused(tiny_cub):
    # keep only train classes: the paper's test classes (101-200) are missing
    for fname in ("images.txt", "image_class_labels.txt"):
        path = tiny_cub / fname
        path.write_text("\n".join(path.read_text().split("\n")[:9]) + "\n")
    with pytest.raises(DvmlError, match="test split of cub is empty"):
        read_dataset("cub", tiny_cub)


def test_index_digest_changes_with_the_image_list(tiny_folder):
    a = read_dataset("folder", tiny_folder).digest()
    assert read_dataset("folder", tiny_folder).digest() == a
    (tiny_folder / "dog" / "1.jpg").rename(tiny_folder / "dog" / "9.jpg")
    assert read_dataset("folder", tiny_folder).digest() != a


def test_inshop_official_partition_file(tiny_inshop):
    from dvml.cache import schema as S

    index = read_dataset("inshop", tiny_inshop)
    _assert_zero_shot(index)
    # an independent reading of the file: skip the count and the header, split the three columns
    rows = [line.split() for line in (tiny_inshop / "Eval/list_eval_partition.txt").read_text().split("\n")[2:]
            if line]
    assert [tuple(s) for s in index.train] == [(r[0], int(r[1][3:])) for r in rows if r[2] == "train"]
    assert [tuple(s) for s in index.test] == [(r[0], int(r[1][3:])) for r in rows if r[2] != "train"]
    code = {"query": S.ROLE_QUERY, "gallery": S.ROLE_GALLERY}
    assert index.test_roles == tuple(code[r[2]] for r in rows if r[2] != "train")
    for item, (n_query, n_gallery) in {4: (1, 2), 5: (2, 1), 6: (1, 1), 7: (2, 2)}.items():  # the fixture's
        roles = [r for s, r in zip(index.test, index.test_roles, strict=True) if s.label == item]
        assert roles.count(S.ROLE_QUERY) == n_query and roles.count(S.ROLE_GALLERY) == n_gallery
    assert {s.label for s in index.train} == {1, 2, 3}
    # roles take part in the job digest; a dataset without roles keeps its old digest
    assert index.digest() != type(index)(index.name, index.root, index.train, index.test, index.split_rule).digest()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda lines: ["99", *lines[1:]], "line 1 says 99 images but 21 are listed"),
    (lambda lines: [lines[0], "image_name item evaluation_status", *lines[2:]], ":2: should be the header"),
    (lambda lines: [*lines[:3], lines[3].replace("train", "val"), *lines[4:]], ":4: evaluation_status must be"),
    (lambda lines: [*lines[:3], lines[3].replace("id_", "item_"), *lines[4:]], ":4: item_id must look like"),
    (lambda lines: [str(len(lines) - 2 - 6), *[x for x in lines[1:] if "gallery" not in x]], "has no gallery image"),
])
def test_inshop_malformed_partition_file_is_named(tiny_inshop, edit, message):
    part = tiny_inshop / "Eval/list_eval_partition.txt"
    part.write_text("\n".join(edit(part.read_text().strip().split("\n"))) + "\n")
    with pytest.raises(DvmlError, match=message):
        read_dataset("inshop", tiny_inshop)


@pytest.mark.parametrize(("name", "command"), [
    ("cub", "dvml data download cub --out DIR"), ("sop", "dvml data download sop --out DIR"),
    ("cars196", "dvml data verify cars196 DIR"), ("inshop", "dvml data download inshop"),
])
def test_a_root_without_the_dataset_names_the_download_command(tmp_path, name, command):
    with pytest.raises(DvmlError) as err:
        read_dataset(name, tmp_path)
    assert command in str(err.value) and str(tmp_path) in str(err.value)
