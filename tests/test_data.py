"""Data loading: every accepted format, label mapping, stratified splits."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tunelab import validate
from tunelab.data import stratified_split

from conftest import toy_rows


def three_class_rows(n=90):
    frame = toy_rows(n)
    frame["label"] = [i % 3 for i in range(n)]  # integer labels 0, 1, 2
    return frame


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet", "tsv", "saved"])
def test_every_format_loads_the_same_rows(suffix, tmp_path, tiny_bert):
    frame = three_class_rows()
    path = tmp_path / f"train.{suffix}"
    if suffix == "csv":
        frame.to_csv(path, index=False)
    elif suffix == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == "parquet":
        frame.to_parquet(path)
    else:
        import datasets

        datasets.Dataset.from_pandas(frame).save_to_disk(str(path))
    job = validate(None, [f"model.name_or_path={tiny_bert}", f"data.train_file={path}", "data.max_length=32",
                          "train.batch_size=4"])
    assert job.label_names == ["0", "1", "2"]
    assert len(job.train) + len(job.validation) == 90
    texts = list(job.data.frames["train"].text) + list(job.data.frames["validation"].text)
    assert sorted(texts) == sorted(frame.text)


TSV_ROWS = ['" the tea was good', 'a 5" box of tea', '"Hi," he said', *(f"plain row {i}" for i in range(37))]


@pytest.mark.parametrize("source", ["train_file", "dataset"])
def test_a_tsv_with_literal_quotes_keeps_every_row_as_written(source, tmp_path, tiny_bert):
    """A stray quote read as CSV quoting would swallow every row up to the next quote into one text."""
    (tmp_path / "data").mkdir()
    lines = ["text\tlabel", *(f"{text}\t{'pos' if i % 2 else 'neg'}" for i, text in enumerate(TSV_ROWS))]
    (tmp_path / "data" / "train.tsv").write_text("\n".join(lines) + "\n")
    data = (f"data.train_file={tmp_path}/data/train.tsv" if source == "train_file"
            else f"data.dataset={tmp_path}/data")
    job = validate(None, [f"model.name_or_path={tiny_bert}", data, "data.max_length=32", "train.batch_size=4"])
    texts = list(job.data.frames["train"].text) + list(job.data.frames["validation"].text)
    assert sorted(texts) == sorted(TSV_ROWS)


def test_a_tsv_written_with_csv_quoting_reads_back_exactly(tmp_path):
    from tunelab.data.delimited import read_csv_as_text

    frame = toy_rows(6)
    frame["text"] = ['he said "hi"', "two\nlines", "a\ttab", '"all quoted"', "plain", "x"]
    frame.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    assert read_csv_as_text(tmp_path / "t.tsv").text.tolist() == frame.text.tolist()
    frame[["text"]].iloc[[0, 3, 4]].to_csv(tmp_path / "one.tsv", sep="\t", index=False)  # no tab or line break
    assert read_csv_as_text(tmp_path / "one.tsv").text.tolist() == ['he said "hi"', '"all quoted"', "plain"]


def test_integer_labels_sort_numerically_and_map_consistently(tmp_path, tiny_bert):
    frame = toy_rows(40)
    frame["label"] = [10 if i % 2 else 9 for i in range(40)]
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_csv(tmp_path / "v.csv", index=False)
    job = validate(None, [f"model.name_or_path={tiny_bert}", f"data.train_file={tmp_path}/t.csv",
                          f"data.validation_file={tmp_path}/v.csv", "data.max_length=32", "train.batch_size=4"])
    assert job.label_names == ["9", "10"]
    assert job.train.labels.tolist() == job.validation.labels.tolist() == [1 if i % 2 else 0 for i in range(40)]


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_labels_keep_the_names_users_wrote(suffix, tmp_path, tiny_bert):
    """Leading zeros and a class called "NA" survive; one missing label (dropped on request) does not turn
    integers into "3.0" in one split and leave "3" in the other."""
    def write(name, labels, blank_row=None):
        frame = toy_rows(40).astype({"label": object})
        frame["label"] = [labels[i % len(labels)] for i in range(40)]
        if blank_row is not None:
            frame.loc[blank_row, "label"] = None
        path = tmp_path / f"{name}.{suffix}"
        frame.to_csv(path, index=False) if suffix == "csv" else frame.to_json(path, orient="records", lines=True)
        return path

    for labels, names in ((["01", "02"], ["01", "02"]), (["NA", "YES"], ["NA", "YES"]), ([3, 7], ["3", "7"])):
        job = validate(None, [f"model.name_or_path={tiny_bert}", "data.max_length=32", "train.batch_size=4",
                              f"data.train_file={write('t', labels, blank_row=5)}", "data.drop_invalid_rows=true",
                              f"data.validation_file={write('v', labels)}"])
        assert job.label_names == names and len(job.train) == 39
        assert job.validation.labels.tolist() == [i % 2 for i in range(40)]


def test_float32_labels_are_named_as_written_and_match_a_float64_split(tmp_path, tiny_bert):
    """A float32 label column (parquet, a datasets Value("float32")) names 0.1 "0.1", as the float64 CSV of
    validation does; widened to a Python float it was "0.10000000149011612", a class validation lacked."""
    frame = toy_rows(40)
    frame["label"] = [0.1 if i % 2 else 0.5 for i in range(40)]
    frame.astype({"label": "float32"}).to_parquet(tmp_path / "t.parquet")
    frame.to_csv(tmp_path / "v.csv", index=False)
    job = validate(None, [f"model.name_or_path={tiny_bert}", f"data.train_file={tmp_path}/t.parquet",
                          f"data.validation_file={tmp_path}/v.csv", "data.max_length=32", "train.batch_size=4"])
    assert job.label_names == ["0.1", "0.5"]
    assert job.train.labels.tolist() == job.validation.labels.tolist() == [0 if i % 2 else 1 for i in range(40)]


def test_carved_validation_is_stratified_seeded_and_disjoint():
    frame = toy_rows(200)
    frame.loc[:149, "label"] = "neg"  # 175 neg / 25 pos
    train, val = stratified_split(frame, "label", 0.2, seed=7)
    again_train, again_val = stratified_split(frame, "label", 0.2, seed=7)
    assert val.index.tolist() == again_val.index.tolist()
    assert set(train.index).isdisjoint(val.index) and len(train) + len(val) == 200
    assert (val.label == "neg").sum() == 35 and (val.label == "pos").sum() == 5  # 20 % of each class


def test_carved_validation_keeps_to_its_fraction_with_many_small_classes():
    """60 classes of 2 rows at 0.1: holding out a row of every class took 60 of 120 (half the training data);
    now 12, each from a different class, every class still in train. A class of one row stays in train."""
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(121)], "label": [f"c{i // 2}" for i in range(121)]})
    train, val = stratified_split(frame, "label", 0.1, seed=3)
    assert len(val) == 12 and val.label.nunique() == 12 and train.label.nunique() == 61
    assert "c60" not in set(val.label)  # its only row
    _, by_share = stratified_split(pd.DataFrame({"label": ["a"] * 50 + ["b"] * 30 + ["c"] * 20}), "label", 0.1, seed=1)
    assert by_share.label.value_counts().to_dict() == {"a": 5, "b": 3, "c": 2}


def test_packaged_dialogue_pairs_are_whole_turns():
    from tunelab.data.packaged import chatterbot_english

    problems: list[str] = []
    frames = chatterbot_english(problems)
    assert not problems
    rows = frames["train"]
    # a bare-string conversation (trivia.yml has one) must not become pairs of single characters
    # (answers may be one character, e.g. "7"; no question is)
    assert rows.prompt.str.len().min() > 1


@pytest.mark.parametrize("size", [1, 2, 3, 5, 6, 7, 11, 12, 13, 50])
def test_max_samples_gives_exactly_that_many_rows_with_every_class_it_can(size):
    from tunelab.data.splits import stratified_sample

    frame = toy_rows(60)
    frame["label"] = ["a"] * 40 + ["b"] * 15 + ["c"] * 5  # 40 / 15 / 5
    sample = stratified_sample(frame, "label", size, seed=3)
    assert len(sample) == size and sample.index.is_unique
    assert sample["label"].nunique() == min(size, 3)
    if size >= 12:  # in proportion, to within one row
        for label, share in (("a", 40 / 60), ("b", 15 / 60), ("c", 5 / 60)):
            assert abs((sample["label"] == label).sum() - share * size) <= 1


class CountingUnfit:
    """Marks rows whose value is a multiple of 3 as too long, and counts the rows it was asked about (each
    one, in the causal-LM task, is a row tokenized)."""

    def __init__(self):
        self.examined = 0

    def __call__(self, frame: pd.DataFrame) -> dict[str, pd.Series]:
        self.examined += len(frame)
        return {"too long": frame["value"] % 3 == 0, "also odd": frame["value"] % 2 == 1}


def test_a_capped_split_examines_only_the_rows_it_draws_and_counts_those_it_drops(monkeypatch):
    from tunelab.data import splits

    frame = pd.DataFrame({"value": range(200_000)})
    unfit = CountingUnfit()
    kept, dropped = splits.fitting_sample(frame, None, 100, seed=5, unfit=unfit)
    fits = (frame["value"] % 3 != 0) & (frame["value"] % 2 == 0)
    assert len(kept) == 100 and fits[kept.index].all() and kept.index.is_monotonic_increasing
    order = np.random.default_rng(5).permutation(len(frame))
    drawn = order[:np.flatnonzero(np.isin(order, kept.index))[-1] + 1]  # up to the last row kept
    assert unfit.examined < len(drawn) + 256  # not 200,000: a cap reads what it keeps, a chunk at a time
    assert sum(dropped.values()) == len(drawn) - 100
    assert dropped["too long"] == int((frame["value"].to_numpy()[drawn] % 3 == 0).sum())  # a row with two
    # faults is counted once, under its first reason
    monkeypatch.setattr(splits, "CHUNK_ROWS", 7)  # the chunk size changes what is read, not what is kept
    again, counted_again = splits.fitting_sample(frame, None, 100, seed=5, unfit=CountingUnfit())
    assert again.equals(kept) and counted_again == dropped
    other, _ = splits.fitting_sample(frame, None, 100, seed=6, unfit=CountingUnfit())
    assert not other.equals(kept)


def test_an_uncapped_or_stratified_split_examines_every_row_a_chunk_at_a_time(monkeypatch):
    from tunelab.data import splits

    monkeypatch.setattr(splits, "CHUNK_ROWS", 64)
    frame = pd.DataFrame({"value": range(1_000), "label": ["a", "b", "c", "d"] * 250})
    unfit = CountingUnfit()
    kept, dropped = splits.fitting_sample(frame, None, None, seed=5, unfit=unfit)
    assert unfit.examined == 1_000 and len(kept) == 333  # the even numbers that are no multiple of 3
    assert dropped == {"too long": 334, "also odd": 333}  # odd multiples of 3 are counted as too long
    stratified, _ = splits.fitting_sample(frame, "label", 50, seed=5, unfit=CountingUnfit())
    assert len(stratified) == 50 and set(stratified["label"]) == {"a", "c"}  # the even rows' labels


def test_a_cap_below_the_number_of_classes_keeps_every_class_named(tmp_path, tiny_bert):
    frame = toy_rows(60)
    frame["label"] = [f"c{i % 12}" for i in range(60)]
    frame.to_csv(tmp_path / "t.csv", index=False)
    job = validate(None, [f"model.name_or_path={tiny_bert}", f"data.train_file={tmp_path}/t.csv",
                          "data.max_train_samples=8", "data.max_eval_samples=5", "data.max_length=32",
                          "train.batch_size=4"])
    assert job.label_names == sorted(f"c{i}" for i in range(12)) and len(job.train) == 8
    names = job.data.frames["train"].label.astype(str)
    assert [job.label_names[i] for i in job.train.labels] == names.tolist()


def test_a_saved_dataset_folder_keeps_its_class_names_and_refuses_several_splits(tmp_path, tiny_bert):
    import datasets

    frame = toy_rows(40)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    one = datasets.Dataset.from_pandas(frame, features=features, preserve_index=False)
    one.save_to_disk(str(tmp_path / "one"))
    args = [f"model.name_or_path={tiny_bert}", "data.max_length=32", "train.batch_size=4"]
    assert validate(None, [*args, f"data.train_file={tmp_path / 'one'}"]).label_names == ["neg", "pos"]
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(Exception, match="holds splits \\['train', 'test'\\]; point at one split's folder"):
        validate(None, [*args, f"data.train_file={tmp_path / 'two'}"])


def test_a_classlabel_keeps_its_class_order_so_ids_match_the_dataset(tmp_path, tiny_bert):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["positive", "negative"])})
    frame = toy_rows(40)
    frame["label"] = [i % 2 for i in range(40)]
    datasets.Dataset.from_pandas(frame, features=features, preserve_index=False).save_to_disk(str(tmp_path / "d"))
    job = validate(None, [f"model.name_or_path={tiny_bert}", f"data.train_file={tmp_path / 'd'}",
                          "data.max_length=32", "train.batch_size=4"])
    assert job.label_names == ["positive", "negative"]  # not sorted: class 0 of the dataset is class 0 here
    rows = job.data.frames["train"].index
    assert job.train.labels.tolist() == [i % 2 for i in rows]


def problems_of(overrides) -> str:
    from tunelab.errors import TunelabInputError

    with pytest.raises(TunelabInputError) as info:
        validate(None, overrides)
    return "\n".join(info.value.problems)


def test_messy_user_data_gets_clear_answers(tmp_path, tiny_bert):
    import datasets
    import pandas as pd

    args = [f"model.name_or_path={tiny_bert}", "data.max_length=32", "train.batch_size=1", "methods=lora"]
    pd.DataFrame({"text": ["good food", "bad tea", "the box"], "label": ["a", "b", "c"]}).to_csv(
        tmp_path / "three.csv", index=False)  # every class a single row: nothing to carve a validation split from
    assert "carved no validation rows" in problems_of([*args, f"data.train_file={tmp_path / 'three.csv'}"])
    many = pd.DataFrame({"text": [f"text {i} good" for i in range(1000)],
                         "label": [f"c{i % 500}" for i in range(1000)]})
    many.to_csv(tmp_path / "many.csv", index=False)
    capped = [*args, f"data.train_file={tmp_path / 'many.csv'}", "data.max_train_samples=7", "data.max_eval_samples=10"]
    kept = [set(validate(None, [*capped, f"train.seed={seed}"]).data.frames["train"]["label"]) for seed in (1, 2)]
    assert len(kept[0]) == 7 and kept[0] != kept[1]  # the seed picks the classes a tiny sample keeps
    blank = pd.DataFrame({"text": [f"row {i}" for i in range(40)], "label": ["a", "b", "  ", ""] * 10})
    blank.to_json(tmp_path / "blank.jsonl", orient="records", lines=True)
    assert "20 rows have no 'label' label" in problems_of([*args, f"data.train_file={tmp_path / 'blank.jsonl'}"])
    assert "is a file; a data file is data.train_file" in problems_of([*args, f"data.dataset={tmp_path / 'many.csv'}"])
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos", "neutral"])})
    rows = pd.DataFrame({"text": [f"row {i}" for i in range(20)], "label": [1] * 20})
    one = datasets.Dataset.from_pandas(rows, features=features, preserve_index=False)
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "oneclass"))
    problems = problems_of([*args, f"data.dataset={tmp_path / 'oneclass'}"])
    assert "data.dataset (train): train has one class only (pos)" in problems
    assert "split 'test' would also be the validation split" in problems_of(
        [*args, f"data.dataset={tmp_path / 'oneclass'}", "data.train_split=test", "data.validation_split=test"])


def test_a_row_with_two_faults_is_dropped_and_counted_once(tmp_path, tiny_bert):
    rows = toy_rows(40)
    rows.loc[[3, 5], "text"] = " "
    rows.loc[[3, 7], "label"] = None  # row 3 has both faults
    rows.to_csv(tmp_path / "train.csv", index=False)
    job = validate(None, [f"model.name_or_path={tiny_bert}", f"data.train_file={tmp_path / 'train.csv'}",
                          "data.max_length=32", "train.batch_size=4", "data.drop_invalid_rows=true"])
    assert sum(job.data.dropped.values()) == 3
    assert len(job.train) + len(job.validation) == 37


def test_labels_that_differ_only_by_surrounding_spaces_are_one_class():
    """A hand-edited CSV's "a " is the class "a", not a second class the model must tell apart from it."""
    import pandas as pd

    from tunelab.tasks.classification import label_names, label_texts

    values = pd.Series(["a", "a ", " b", "3.0 "], dtype=object)
    assert label_names(values) == ["3", "a", "b"] and label_texts(values) == ["a", "a", "b", "3"]


def test_labels_that_look_like_scores_are_noted_not_silently_made_classes(tmp_path, tiny_bert):
    from tunelab.tasks.classification import continuous_label_notes

    frame = toy_rows(120)
    frame["label"] = [f"{(i % 24) / 5:.1f}" for i in range(120)]  # 0.0 ... 4.6: STS-B-like scores
    frame.to_csv(tmp_path / "scores.csv", index=False)
    summary = validate(None, [f"model.name_or_path={tiny_bert}", f"data.train_file={tmp_path / 'scores.csv'}",
                              "data.max_length=32", "train.batch_size=8", "methods=lora"]).summary()
    assert "24 labels are numbers with decimals (0, 0.2, 0.4, 0.6, ...)" in summary["notes"][0]
    assert continuous_label_notes([str(i) for i in range(1, 20)]) == []  # whole numbers: ratings, classes
    assert continuous_label_notes(["0.5", "1.5", "neg"]) == []
    from tunelab.tasks.classification import case_variant_notes

    assert case_variant_notes(["Pos", "neg", "pos"]) == ["labels 'Pos' and 'pos' differ only in case: each is a "
                                                         "class of its own"]
    assert case_variant_notes(["neg", "pos"]) == []


def test_labels_composed_and_decomposed_are_one_class_and_cut_rows_are_counted(tmp_path, tiny_bert):
    """'café' written NFC in train and NFD in validation (files from different systems) printed alike in a
    refusal saying the validation labels do not occur in train. Rows cut to data.max_length are counted."""
    from tunelab.tasks.classification import label_text

    assert label_text("cafe\u0301") == label_text("caf\u00e9") == "caf\u00e9"
    train, validation = toy_rows(60), toy_rows(20)
    train["label"] = ["caf\u00e9" if v == "pos" else "th\u00e9" for v in train.label]
    validation["label"] = ["cafe\u0301" if v == "pos" else "the\u0301" for v in validation.label]
    train.loc[:2, "text"] = " ".join(["good"] * 100)  # three rows longer than max_length
    train.to_csv(tmp_path / "train.csv", index=False)
    validation.to_csv(tmp_path / "validation.csv", index=False)
    summary = validate(None, [f"model.name_or_path={tiny_bert}", f"data.train_file={tmp_path / 'train.csv'}",
                              f"data.validation_file={tmp_path / 'validation.csv'}", "data.max_length=24",
                              "train.batch_size=8", "methods=lora"]).summary()
    assert summary["labels"] == ["caf\u00e9", "th\u00e9"]
    assert summary["train_rows_at_max_length"] == 3


def test_a_json_column_of_mixed_types_gets_a_hint(tmp_path, monkeypatch):
    """Arrow types a JSON column by its first block of rows: numbers, then "neg" 200,000 rows on, fails only in a
    large file (here the reader's error is raised directly: such a file takes seconds to read)."""
    import datasets
    import pyarrow as pa

    from tunelab.data.io import read_table

    (tmp_path / "big.jsonl").write_text('{"text": "a", "label": 1}\n')

    def fails(*args, **kwargs):
        raise pa.ArrowInvalid("Failed to parse string: '\"neg\"' as a scalar of type int64")
    monkeypatch.setattr(datasets, "load_dataset", fails)
    problems: list[str] = []
    assert read_table(str(tmp_path / "big.jsonl"), "data.train_file", problems) is None
    assert problems[0].endswith("a column holds numbers in some rows and text in others: quote all its values")


@pytest.mark.parametrize("layout", ["jsonl file", "parquet file", "json folder"])
def test_a_file_edited_with_its_modification_time_kept_is_read_anew(layout, tiny_bert, tmp_path):
    """datasets' cache keys a local file by path and modification time: a file rewritten with its time kept
    (cp -p, rsync -a, an unzip) was read as it was before."""
    import os

    folder = tmp_path / "data"
    folder.mkdir()
    name = {"jsonl file": "train.jsonl", "parquet file": "train.parquet", "json folder": "train.jsonl"}[layout]
    path = folder / name
    source = f"data.dataset={folder}" if layout == "json folder" else f"data.train_file={path}"

    def write(labels):
        frame = toy_rows(40).assign(label=lambda f: f.label.map(labels))
        if name.endswith(".parquet"):
            frame.to_parquet(path)
        else:
            frame.to_json(path, orient="records", lines=True)
        os.utime(path, (1_600_000_000, 1_600_000_000))

    def labels_read():
        job = validate(None, [f"model.name_or_path={tiny_bert}", source, "data.max_length=32", "train.batch_size=4"])
        return job.label_names

    write({"pos": "good", "neg": "bad"})
    assert labels_read() == ["bad", "good"]
    write({"pos": "fine", "neg": "poor"})  # the same modification time
    assert labels_read() == ["fine", "poor"]


def test_split_and_config_keys_the_packaged_dataset_has_no_use_for_are_refused(tiny_bert):
    """data.test_split=train passed and trained on the packaged splits (the same split for train and test is
    refused for a dataset that has named splits)."""
    from tunelab.errors import TunelabInputError

    with pytest.raises(TunelabInputError) as refused:
        validate(None, [f"model.name_or_path={tiny_bert}", "data.max_length=32", "data.test_split=train",
                        "data.dataset_revision=v2"])
    assert [p.split(":")[0] for p in refused.value.problems] == ["data.dataset_revision", "data.test_split"]
    assert "the packaged dataset 'amazon-fine-food' has fixed splits" in refused.value.problems[0]
