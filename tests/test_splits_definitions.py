"""Splits against their definition: the documented draw (sorted ids, one seeded permutation,
round-half-up sizes, ``np.array_split`` parts) written out directly, the small-cohort edge
cases (a tiny test fraction still leaves a test subject), seeds that matter for every cohort,
and each rule of the table check."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from brainuad.errors import InputError
from brainuad.slices.splits import (
    check_splits,
    dataset_splits,
    healthy_splits,
    lesion_splits,
    read_splits,
    release_splits,
    subjects_in,
    write_splits,
)


def assignment(table: pd.DataFrame, fold: int) -> dict[str, str]:
    rows = table[table["fold"] == fold]
    return dict(zip(rows["subject"], rows["split"], strict=True))


def reference_healthy(ids, n_folds, test_fraction, seed):
    ids = sorted(ids)
    n_test = math.floor(test_fraction * len(ids) + 0.5)
    if test_fraction > 0:
        n_test = max(n_test, 1)
    shuffled = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    test, rest = shuffled[:n_test], shuffled[n_test:]
    # np.array_split: the first len(rest) % n_folds parts are one longer
    sizes = [len(rest) // n_folds + (1 if k < len(rest) % n_folds else 0) for k in range(n_folds)]
    starts = np.cumsum([0, *sizes])
    folds = []
    for k in range(n_folds):
        val = set(rest[starts[k] : starts[k + 1]])
        folds.append({s: "test" if s in test else "val" if s in val else "train" for s in ids})
    return folds


@pytest.mark.parametrize(
    ("n", "n_folds", "fraction", "seed"),
    [(10, 3, 0.25, 0), (6, 2, 0.25, 4), (11, 4, 0.1, 9), (7, 2, 0.0, 1)],
)
def test_healthy_splits_follow_the_documented_draw(n, n_folds, fraction, seed):
    ids = [f"s{i:02d}" for i in range(n)]
    table = healthy_splits(ids[::-1], n_folds=n_folds, test_fraction=fraction, seed=seed)
    expected = reference_healthy(ids, n_folds, fraction, seed)
    assert [assignment(table, k) for k in range(n_folds)] == expected
    assert table["fold"].dtype == np.int64
    # rows sorted by fold, then subject
    assert list(table["fold"]) == sorted(table["fold"])
    for k in range(n_folds):
        assert list(table[table["fold"] == k]["subject"]) == sorted(ids)


def test_healthy_test_size_rounds_half_up_and_never_to_zero():
    ids = [f"s{i}" for i in range(10)]
    sizes = {
        f: sum(
            v == "test"
            for v in assignment(healthy_splits(ids, n_folds=2, test_fraction=f, seed=0), 0).values()
        )
        for f in (0.25, 0.15, 0.01, 0.0, 0.5)
    }
    # 2.5 -> 3 (not banker's 2), 1.5 -> 2, 0.1 -> at least 1, 0 -> none, 5 -> 5
    assert sizes == {0.25: 3, 0.15: 2, 0.01: 1, 0.0: 0, 0.5: 5}


def test_healthy_splits_refuse_too_few_for_the_folds():
    # 4 subjects, 1 to test, 3 left: enough for 3 folds, not for 4
    healthy_splits(["a", "b", "c", "d"], n_folds=3, test_fraction=0.2, seed=0)
    with pytest.raises(InputError, match=r"4 given, 1 go to the test set .* at least 5 subjects"):
        healthy_splits(["a", "b", "c", "d"], n_folds=4, test_fraction=0.2, seed=0)
    for bad in (-0.1, 1.0):
        with pytest.raises(
            InputError, match=r"healthy_test_fraction: expected a value in \[0, 1\)"
        ):
            healthy_splits(["a", "b", "c", "d"], n_folds=2, test_fraction=bad, seed=0)
    for bad in (1, 2.5):
        with pytest.raises(InputError, match="n_folds: expected an integer >= 2"):
            healthy_splits(["a", "b", "c", "d"], n_folds=bad, test_fraction=0.0, seed=0)
    with pytest.raises(InputError, match=r"healthy subjects: duplicate subject ids \['a'\]"):
        healthy_splits(["a", "a", "b", "c"], n_folds=2, test_fraction=0.0, seed=0)
    with pytest.raises(InputError, match="healthy subjects: empty subject id"):
        healthy_splits(["", "b", "c"], n_folds=2, test_fraction=0.0, seed=0)


def reference_lesion(ids, val_fraction, train_fraction, seed):
    ids = sorted(ids)
    n_train = max(math.floor(train_fraction * len(ids) + 0.5), 1) if train_fraction > 0 else 0
    shuffled = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    train, rest = shuffled[:n_train], shuffled[n_train:]
    n_val = math.floor(val_fraction * len(ids) + 0.5)
    n_val = min(max(n_val, 1), len(rest) - 1) if len(rest) >= 2 else 0
    val = rest[:n_val]
    return {s: "train" if s in train else "val" if s in val else "test" for s in ids}


@pytest.mark.parametrize(
    ("n", "val_fraction", "train_fraction", "seed"),
    [
        (10, 0.3, 0.0, 0),
        (10, 0.25, 0.2, 3),
        (5, 0.9, 0.0, 1),
        (1, 0.3, 0.0, 0),
        (2, 0.1, 0.0, 5),
        (8, 0.1, 0.01, 2),
    ],
)
def test_lesion_splits_follow_the_documented_draw(n, val_fraction, train_fraction, seed):
    ids = [f"l{i}" for i in range(n)]
    table = lesion_splits(
        ids[::-1], n_folds=3, val_fraction=val_fraction, train_fraction=train_fraction, seed=seed
    )
    expected = reference_lesion(ids, val_fraction, train_fraction, seed)
    assert [assignment(table, k) for k in range(3)] == [expected] * 3
    counts = pd.Series(expected).value_counts()
    if n >= 2:
        assert counts["val"] >= 1 and counts["test"] >= 1
    else:
        assert dict(counts) == {"test": 1}


def test_lesion_splits_depend_on_the_seed():
    ids = [f"l{i}" for i in range(12)]
    draws = {
        tuple(
            sorted(assignment(lesion_splits(ids, n_folds=2, val_fraction=0.5, seed=s), 0).items())
        )
        for s in range(4)
    }
    assert len(draws) > 1
    trains = {
        tuple(
            sorted(
                s
                for s, v in assignment(
                    lesion_splits(ids, n_folds=2, val_fraction=0.3, train_fraction=0.3, seed=seed),
                    0,
                ).items()
                if v == "train"
            )
        )
        for seed in range(4)
    }
    assert len(trains) > 1


def test_lesion_splits_reject():
    with pytest.raises(InputError, match=r"lesion_val_fraction: expected a value in \(0, 1\)"):
        lesion_splits(["a", "b"], n_folds=2, val_fraction=0.0, seed=0)
    with pytest.raises(InputError, match=r"lesion_val_fraction: expected a value in \(0, 1\)"):
        lesion_splits(["a", "b"], n_folds=2, val_fraction=1.0, seed=0)
    with pytest.raises(InputError, match=r"lesion_train_fraction: expected a value in \[0, 1\)"):
        lesion_splits(["a", "b"], n_folds=2, val_fraction=0.5, train_fraction=1.0, seed=0)
    with pytest.raises(InputError, match="lesion subjects: none given"):
        lesion_splits([], n_folds=2, val_fraction=0.5, seed=0)
    with pytest.raises(InputError, match="puts 1 in train, leaving fewer than 2"):
        lesion_splits(["a", "b"], n_folds=2, val_fraction=0.5, train_fraction=0.1, seed=0)
    lesion_splits(["a", "b", "c"], n_folds=2, val_fraction=0.5, train_fraction=0.1, seed=0)


def test_release_splits_per_fold_and_broadcast():
    table = release_splits(
        {"b": "train, val,test", "a": "test", "c": "val,train,train"}, n_folds=2, where="sheet.tsv"
    )
    assert assignment(table, 0) == {"a": "test", "b": "train", "c": "val"}
    assert assignment(table, 1) == {"a": "test", "b": "val", "c": "train"}
    assert sorted(set(table["fold"])) == [0, 1]
    with pytest.raises(InputError, match=r"sheet.tsv: subject b: release split \['tst'\]"):
        release_splits({"b": "train,tst"}, n_folds=2, where="sheet.tsv")
    with pytest.raises(
        InputError, match=r"has 2 folds, splits.n_folds is 3; set n_folds to at most 2"
    ):
        release_splits({"b": "train,val"}, n_folds=3, where="sheet.tsv")


def test_dataset_splits_sources_and_defaults():
    ids = [f"s{i}" for i in range(8)]
    release = dict.fromkeys(ids, "train,val")
    options = {"n_folds": 2}
    from_release = dataset_splits(
        ids, release=release, healthy=True, options=options, seed=0, where="w"
    )
    assert set(from_release["split"]) == {"train", "val"}
    drawn = dataset_splits(
        ids, release=release, healthy=True, options={**options, "source": "draw"}, seed=0, where="w"
    )
    pd.testing.assert_frame_equal(drawn, healthy_splits(ids, n_folds=2, test_fraction=0.25, seed=0))
    partial = {**release, "s0": ""}  # a release for only some subjects is none
    assert dataset_splits(
        ids, release=partial, healthy=True, options=options, seed=0, where="w"
    ).equals(drawn)
    lesion = dataset_splits(ids, release=None, healthy=False, options=options, seed=3, where="w")
    pd.testing.assert_frame_equal(
        lesion, lesion_splits(ids, n_folds=2, val_fraction=0.3, train_fraction=0.0, seed=3)
    )
    with pytest.raises(InputError, match=r"w: splits.source is 'release' but this dataset"):
        dataset_splits(
            ids,
            release=None,
            healthy=False,
            options={**options, "source": "release"},
            seed=0,
            where="w",
        )


GOOD = pd.DataFrame(
    {
        "subject": ["a", "b", "a", "b"],
        "split": ["train", "val", "val", "train"],
        "fold": [0, 0, 1, 1],
    }
)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (GOOD[["subject", "fold", "split"]], "columns .* expected"),
        (GOOD.iloc[:0], "no rows"),
        (
            GOOD.assign(split=["train", None, "val", "train"]),
            r"missing values in column\(s\) \['split'\]",
        ),
        (GOOD.assign(split=["train", "valid", "val", "train"]), r"split values \['valid'\]"),
        (GOOD.assign(fold=[0, 0, 0.5, 0.5]), "fold must hold integers"),
        (GOOD.assign(fold=["0", "0", "x", "x"]), "fold must hold integers"),
        (GOOD.assign(fold=[1, 1, 2, 2]), r"folds \[1, 2\], expected 0..1"),
        (GOOD.assign(subject=["a", "a", "a", "b"]), r"subject 'a' appears 2 times in fold 0"),
        (GOOD.assign(subject=["a", "b", "a", "c"]), r"fold 1 lists different subjects from fold 0"),
    ],
)
def test_check_splits_rules(table, match):
    with pytest.raises(InputError, match=f"my.csv: {match}"):
        check_splits(table, source="my.csv")


def test_write_read_and_select(tmp_path):
    path = tmp_path / "splits.csv"
    write_splits(GOOD.iloc[::-1], path)
    lines = path.read_text().splitlines()
    assert lines == ["subject,split,fold", "a,train,0", "b,val,0", "a,val,1", "b,train,1"]
    back = read_splits(path)
    assert back["fold"].dtype == np.int64
    assert subjects_in(path, fold=1, split="val") == ["a"]
    assert subjects_in(back, fold=0, split="test") == []
    with pytest.raises(InputError, match=r"split: 'tests', expected one of"):
        subjects_in(back, fold=0, split="tests")
    with pytest.raises(InputError, match=r"fold 2 not present \(folds \[0, 1\]\)"):
        subjects_in(back, fold=2, split="val")
    (tmp_path / "bad.csv").write_text('subject,split,fold\n"a,train,0\n')
    with pytest.raises(InputError, match=r"bad\.csv"):
        read_splits(tmp_path / "bad.csv")
    (tmp_path / "gap.csv").write_text("subject,split,fold\na,,0\n")
    with pytest.raises(InputError, match=r"missing values in column\(s\) \['split'\]"):
        read_splits(tmp_path / "gap.csv")


def test_dataset_splits_pass_the_configured_fractions():
    ids = [f"s{i}" for i in range(10)]
    options = {
        "n_folds": 2,
        "healthy_test_fraction": 0.5,
        "lesion_val_fraction": 0.5,
        "lesion_train_fraction": 0.2,
    }
    healthy = dataset_splits(ids, release=None, healthy=True, options=options, seed=1, where="w")
    pd.testing.assert_frame_equal(
        healthy, healthy_splits(ids, n_folds=2, test_fraction=0.5, seed=1)
    )
    lesion = dataset_splits(ids, release=None, healthy=False, options=options, seed=1, where="w")
    pd.testing.assert_frame_equal(
        lesion, lesion_splits(ids, n_folds=2, val_fraction=0.5, train_fraction=0.2, seed=1)
    )
    with pytest.raises(InputError, match=r"^w: subject s0: release split \['x'\]"):
        dataset_splits(
            ids, release=dict.fromkeys(ids, "x"), healthy=True, options=options, seed=1, where="w"
        )


def test_messages_name_the_table_and_the_offenders():
    ids = [f"d{i}" for i in range(7)]
    with pytest.raises(
        InputError,
        match=r"^lesion subjects: duplicate subject ids \['d0', 'd1', 'd2', 'd3', 'd4'\]$",
    ):
        lesion_splits(ids + ids, n_folds=2, val_fraction=0.5, seed=0)
    with pytest.raises(InputError, match=r"^lesion subjects: none given, expected at least one$"):
        lesion_splits([], n_folds=2, val_fraction=0.5, seed=0)
    with pytest.raises(InputError, match=r"leaving 3 for training; n_folds=4 needs at least 4"):
        healthy_splits(["a", "b", "c", "d"], n_folds=4, test_fraction=0.2, seed=0)
    with pytest.raises(InputError, match=r"^splits table: no rows$"):
        check_splits(GOOD.iloc[:0])
    folds = GOOD.assign(fold=[0.5, 1.5, 2.5, 3.5, 4.5, 5.5][:4])
    with pytest.raises(InputError, match=r"got \[0.5, 1.5, 2.5, 3.5\]$"):
        check_splits(folds)
    many = pd.DataFrame(
        {"subject": list("abcdefg"), "split": ["train"] * 7, "fold": [0.5] * 6 + [1.5]}
    )
    with pytest.raises(InputError, match=r"got \[0.5, 1.5\]$"):
        check_splits(many)
    with pytest.raises(InputError, match=r"subject 'a' appears 2 times in fold 0 \(splits"):
        check_splits(GOOD.assign(subject=["a", "a", "a", "b"]))
    other = GOOD.assign(subject=["a", "b", "a", "c"])
    with pytest.raises(
        InputError,
        match=r"fold 1 lists different subjects from fold 0 \(e.g. \['b', 'c'\]\); every fold "
        r"must assign every subject$",
    ):
        check_splits(other)


def test_files_are_named_in_errors_and_ids_stay_text(tmp_path):
    path = tmp_path / "splits.csv"
    with pytest.raises(InputError, match=r"splits.csv: no rows"):
        write_splits(GOOD.iloc[:0], path)
    with pytest.raises(InputError, match=r"missing.csv: splits file does not exist"):
        read_splits(tmp_path / "missing.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(
        InputError, match=r"bin.csv: not a readable splits CSV \(subject, split, fold\) \("
    ):
        read_splits(tmp_path / "bin.csv")
    table = pd.DataFrame(
        {
            "subject": ["NA", "null", "NA", "null"],
            "split": ["train", "val", "val", "train"],
            "fold": [0, 0, 1, 1],
        }
    )
    write_splits(table, path)
    back = read_splits(path)
    assert back["subject"].tolist() == ["NA", "null", "NA", "null"]  # ids, not missing values
    with pytest.raises(InputError, match=r"splits.csv: fold 3 not present"):
        subjects_in(path, fold=3, split="val")
    with pytest.raises(InputError, match=r"^splits table: fold 3 not present"):
        subjects_in(back, fold=3, split="val")
