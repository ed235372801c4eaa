"""Tests of subject-level splits: invariants, determinism and the CSV reader."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from brainuad.errors import InputError
from brainuad.slices.splits import (
    SPLITS,
    check_splits,
    dataset_splits,
    healthy_splits,
    lesion_splits,
    read_splits,
    subjects_in,
    write_splits,
)

HEALTHY = [f"{i:03d}" for i in range(23)]  # zero-padded ids must survive the CSV round trip
LESION = [f"brats-{i}" for i in range(7)]


def by_fold(table: pd.DataFrame, fold: int) -> dict[str, str]:
    rows = table[table["fold"] == fold]
    return dict(zip(rows["subject"], rows["split"], strict=True))


@pytest.mark.parametrize(("n_folds", "test_fraction"), [(2, 0.25), (5, 0.2), (3, 0.0)])
def test_healthy_split_invariants(n_folds, test_fraction):
    table = healthy_splits(HEALTHY, n_folds=n_folds, test_fraction=test_fraction, seed=1)
    assert list(table.columns) == ["subject", "split", "fold"]
    assert sorted(set(table["fold"])) == list(range(n_folds))
    check_splits(table)
    folds = [by_fold(table, k) for k in range(n_folds)]
    for assignment in folds:
        assert sorted(assignment) == HEALTHY  # every subject, exactly once per fold
    test = {s for s, split in folds[0].items() if split == "test"}
    assert all({s for s, split in f.items() if split == "test"} == test for f in folds)
    assert len(test) == round(test_fraction * len(HEALTHY))
    cohort = set(HEALTHY) - test
    val_sets = [{s for s, split in f.items() if split == "val"} for f in folds]
    assert sorted(s for val in val_sets for s in val) == sorted(cohort)  # a partition
    assert max(map(len, val_sets)) - min(map(len, val_sets)) <= 1
    for assignment, val in zip(folds, val_sets, strict=True):
        train = {s for s, split in assignment.items() if split == "train"}
        assert train == cohort - val and train and not train & test


def test_healthy_splits_deterministic_and_order_free():
    reference = healthy_splits(HEALTHY, n_folds=3, test_fraction=0.25, seed=7)
    shuffled = HEALTHY[:]
    random.Random(0).shuffle(shuffled)
    again = healthy_splits(shuffled, n_folds=3, test_fraction=0.25, seed=7)
    pd.testing.assert_frame_equal(reference, again)
    other = healthy_splits(HEALTHY, n_folds=3, test_fraction=0.25, seed=8)
    assert not reference.equals(other)


@pytest.mark.parametrize(
    ("subjects", "kwargs", "match"),
    [
        (HEALTHY, {"n_folds": 1}, "n_folds"),
        (HEALTHY[:4], {"n_folds": 4}, "at least 5"),
        (HEALTHY, {"test_fraction": 1.0}, "test_fraction"),
        (["a", "b", "a", "c", "d"], {}, "duplicate"),
    ],
)
def test_healthy_splits_rejects(subjects, kwargs, match):
    options = {"n_folds": 2, "test_fraction": 0.25, "seed": 0, **kwargs}
    with pytest.raises(InputError, match=match):
        healthy_splits(subjects, **options)


@pytest.mark.parametrize("subjects", [LESION, LESION[:2], LESION[:1]])
def test_lesion_splits(subjects):
    table = lesion_splits(subjects, n_folds=3, val_fraction=0.34, seed=0)
    check_splits(table)
    folds = [by_fold(table, k) for k in range(3)]
    assert all(f == folds[0] for f in folds)
    assert sorted(folds[0]) == sorted(subjects)
    val = {s for s, split in folds[0].items() if split == "val"}
    test = {s for s, split in folds[0].items() if split == "test"}
    assert not val & test and val | test == set(subjects)
    assert set(folds[0].values()) <= {"val", "test"}
    if len(subjects) >= 2:
        assert val and test
    else:
        assert test == set(subjects)
    shuffled = list(reversed(subjects))
    pd.testing.assert_frame_equal(
        table, lesion_splits(shuffled, n_folds=3, val_fraction=0.34, seed=0)
    )


def test_lesion_splits_rejects():
    with pytest.raises(InputError, match="none given"):
        lesion_splits([], n_folds=2, val_fraction=0.3, seed=0)
    with pytest.raises(InputError, match="val_fraction"):
        lesion_splits(LESION, n_folds=2, val_fraction=0.0, seed=0)


def test_round_trip_and_subjects_in(tmp_path):
    table = healthy_splits(HEALTHY, n_folds=2, test_fraction=0.25, seed=3)
    path = tmp_path / "splits" / "healthy.csv"
    write_splits(table, path)
    assert path.read_text().splitlines()[0] == "subject,split,fold"
    back = read_splits(path)
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    assert back["subject"].tolist() == table["subject"].tolist()  # "001" stays "001"
    for fold in (0, 1):
        for split in ("train", "val", "test"):
            expected = sorted(s for s, sp in by_fold(table, fold).items() if sp == split)
            assert subjects_in(path, fold=fold, split=split) == expected
            assert subjects_in(table, fold=fold, split=split) == expected
    with pytest.raises(InputError, match="fold 2"):
        subjects_in(path, fold=2, split="val")
    with pytest.raises(InputError, match="split"):
        subjects_in(table, fold=0, split="training")
    lesion = lesion_splits(LESION, n_folds=2, val_fraction=0.3, seed=0)
    assert subjects_in(lesion, fold=1, split="train") == []


def test_reader_rejects_subject_in_two_splits(tmp_path):
    path = tmp_path / "bad.csv"
    rows = ["a,train,0", "b,val,0", "c,test,0", "a,val,0", "a,val,1", "b,train,1", "c,test,1"]
    path.write_text("\n".join(["subject,split,fold", *rows]) + "\n")
    with pytest.raises(InputError, match=rf"{path}.*'a'.*fold 0"):
        read_splits(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("subject,split\na,train\n", "columns"),
        ("subject,split,fold\na,training,0\n", "split values"),
        ("subject,split,fold\na,train,1\n", "0-based"),
        ("subject,split,fold\na,train,x\n", "integers"),
        ("subject,split,fold\na,train,0\nb,val,0\na,val,1\n", "fold 1 lists different"),
        ("subject,split,fold\n,train,0\n", "missing values"),
    ],
)
def test_reader_rejects_malformed(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as err:
        read_splits(path)
    assert str(path) in str(err.value)


def test_reader_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_splits(tmp_path / "absent.csv")


def test_lesion_train_split_is_disjoint_seeded_and_shared_by_folds():
    """`lesion_train_fraction`: a subject-level train part for weakly supervised methods;
    val and test never meet it, every fold has the same three parts, the seed decides."""
    subjects = [f"sub-{i:02d}" for i in range(20)]
    table = lesion_splits(subjects, n_folds=3, val_fraction=0.05, train_fraction=0.75, seed=0)
    check_splits(table)
    folds = [by_fold(table, k) for k in range(3)]
    assert all(f == folds[0] for f in folds)
    parts = {name: {s for s, split in folds[0].items() if split == name} for name in SPLITS}
    assert (len(parts["train"]), len(parts["val"]), len(parts["test"])) == (15, 1, 4)
    other_seed = by_fold(
        lesion_splits(subjects, n_folds=3, val_fraction=0.05, train_fraction=0.75, seed=1), 0
    )
    assert {s for s, split in other_seed.items() if split == "train"} != parts["train"]
    # No train fraction: the val/test assignment of a study without weak supervision.
    plain = by_fold(lesion_splits(subjects, n_folds=3, val_fraction=0.05, seed=0), 0)
    assert set(plain.values()) == {"val", "test"}


def test_lesion_train_fraction_rejects():
    with pytest.raises(InputError, match="lesion_train_fraction"):
        lesion_splits(LESION, n_folds=2, val_fraction=0.3, train_fraction=1.0, seed=0)
    with pytest.raises(InputError, match="fewer than 2 for val and test"):
        lesion_splits(LESION[:2], n_folds=2, val_fraction=0.3, train_fraction=0.5, seed=0)


# ---- split sizes as counts (cDDPM paper, Table 1) ---------------------------------------


def split_counts(table: pd.DataFrame, fold: int) -> dict[str, int]:
    return {s: list(by_fold(table, fold).values()).count(s) for s in SPLITS}


def test_healthy_sizes_give_exact_counts_and_disjoint_val_blocks():
    # The paper's IXI 358 / 44 / 158 scaled down: 30 subjects, 3 folds of val 4, test 7.
    subjects = [f"ixi{i:03d}" for i in range(30)]
    table = healthy_splits(
        subjects, n_folds=3, test_fraction=0.5, seed=2, sizes={"val": 4, "test": 7}
    )
    check_splits(table)
    for k in range(3):
        assert split_counts(table, k) == {"train": 19, "val": 4, "test": 7}
    val_sets = [{s for s, v in by_fold(table, k).items() if v == "val"} for k in range(3)]
    assert len(set().union(*val_sets)) == 12  # no subject in val twice
    # With a train count the cohort is train + val; the surplus is in no split of any fold.
    exact = healthy_splits(
        subjects, n_folds=3, test_fraction=0.5, seed=2, sizes={"train": 10, "val": 4, "test": 7}
    )
    check_splits(exact)
    for k in range(3):
        assert split_counts(exact, k) == {"train": 10, "val": 4, "test": 7}
    assert len(set(exact["subject"])) == 21


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ({"val": 8, "test": 7}, r"cannot be met by 30 healthy subjects"),  # 3 x 8 > 23
        ({"train": 20, "val": 4, "test": 7}, r"cannot be met"),  # 7 + 24 > 30
        ({"test": 29}, r"leaving 1 for training"),
        ({"train": 5}, r"a train count needs a val count"),
        ({"validation": 3}, r"keys \['validation'\]"),
    ],
)
def test_healthy_sizes_reject_impossible_counts(sizes, match):
    subjects = [f"ixi{i:03d}" for i in range(30)]
    with pytest.raises(InputError, match=match):
        healthy_splits(subjects, n_folds=3, test_fraction=0.25, seed=0, sizes=sizes)


def test_lesion_val_subjects_exact_and_errors():
    subjects = [f"brats{i:02d}" for i in range(12)]
    options = {"n_folds": 2, "lesion_val_fraction": 0.5, "lesion_val_subjects": {"brats21": 3}}
    table = dataset_splits(
        subjects,
        release=None,
        healthy=False,
        options=options,
        seed=0,
        where="s.tsv",
        dataset="brats21",
    )
    assert split_counts(table, 0) == {"train": 0, "val": 3, "test": 9}
    # Another dataset keeps the fraction; a weakly supervised train part comes first.
    other = dataset_splits(
        subjects,
        release=None,
        healthy=False,
        options={**options, "lesion_train_fraction": 0.25},
        seed=0,
        where="s.tsv",
        dataset="mslub",
    )
    assert split_counts(other, 1) == {"train": 3, "val": 6, "test": 3}
    # Per dataset: only the cohorts the mapping names give up train subjects.
    per_dataset = {**options, "lesion_train_fraction": {"mslub": 0.25}}
    for dataset, expected in (("mslub", 3), ("wmh", 0)):
        table = dataset_splits(
            subjects,
            release=None,
            healthy=False,
            options=per_dataset,
            seed=0,
            where="s.tsv",
            dataset=dataset,
        )
        assert split_counts(table, 0)["train"] == expected
    with_train = lesion_splits(
        subjects, n_folds=2, val_fraction=0.3, seed=0, train_fraction=0.25, val_subjects=8
    )
    assert split_counts(with_train, 0) == {"train": 3, "val": 8, "test": 1}
    with pytest.raises(InputError, match=r"s\.tsv \(dataset brats21\).*lesion_val_subjects: 12"):
        dataset_splits(
            subjects,
            release=None,
            healthy=False,
            options={**options, "lesion_val_subjects": {"brats21": 12}},
            seed=0,
            where="s.tsv",
            dataset="brats21",
        )


def test_release_folds_are_kept_whatever_the_counts():
    subjects = ["sub-a", "sub-b", "sub-c", "sub-d", "sub-e"]
    folds = ["test", "val,train", "train,val", "train,val", "val,train"]
    release = dict(zip(subjects, folds, strict=True))
    options = {"n_folds": 2, "healthy_sizes": {"train": 40, "val": 44, "test": 158}}
    table = dataset_splits(
        subjects, release=release, healthy=True, options=options, seed=0, where="s"
    )
    assert by_fold(table, 1) == {
        "sub-a": "test", "sub-b": "train", "sub-c": "val", "sub-d": "val", "sub-e": "train"
    }  # fmt: skip
