"""Config loading: YAML + overrides → typed config; every problem reported at once."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.config import apply_override, load_config
from tunelab.errors import TunelabInputError


def problems_of(overrides, path=None):
    with pytest.raises(TunelabInputError) as info:
        load_config(path, overrides)
    return info.value.problems


def test_packaged_default_loads_with_all_four_methods():
    cfg = load_config()
    assert cfg.methods == ["full", "llrd", "lora", "prompt-tuning"]
    assert cfg.options("llrd").decay == 0.9 and cfg.options("lora").r == 8


def test_overrides_are_typed_and_reach_every_section():
    cfg = load_config(None, ["train.lr=1e-3", "train.epochs=2", "methods=lora,full", "lora.r=16",
                             "lora.target_modules=query,key", "prompt-tuning.num_virtual_tokens=7",
                             "llrd.lr=2e-4", "data.max_length=64", "train.seed=7"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # '1e-3' is a string to PyYAML
    assert cfg.train.epochs == 2.0 and cfg.methods == ["lora", "full"]
    assert cfg.options("lora").r == 16 and cfg.options("lora").target_modules == ["query", "key"]
    assert cfg.options("prompt-tuning").num_virtual_tokens == 7
    assert cfg.options("llrd").lr == 2e-4 and cfg.data.max_length == 64 and cfg.train.seed == 7


def test_an_override_keeps_its_text_where_the_field_wants_text():
    # YAML reads 1.10 as the float 1.1, 0123 as octal 83 and 2024-01-01 as a date; fields decide instead.
    cfg = load_config(None, ["model.revision=1.10", "data.dataset_revision=2024-01-01", "train.seed=0123",
                             "train.fsdp=yes", "data.max_train_samples=null"])
    assert cfg.model.revision == "1.10" and cfg.data.dataset_revision == "2024-01-01"
    assert cfg.train.seed == 123 and cfg.train.fsdp is True and cfg.data.max_train_samples is None
    assert "train: expected a mapping of options, got 5" in problems_of(["train=5"])
    # a number is decimal text: YAML 1.1 reads 1:30 as 90 (base 60) and 0x10 as 16; refused as written
    for item, problem in (("train.seed=1:30", "train.seed: expected an integer, got '1:30'"),
                          ("train.lr=0x10", "train.lr: expected a number, got '0x10'"),
                          ("train.seed=2024-01-01", "train.seed: expected an integer, got '2024-01-01'")):
        assert problem in problems_of([item])


def test_a_mapping_override_adds_to_its_section_and_a_space_entry_takes_a_dotted_name(tmp_path):
    """`data={max_length: 64}` replaced the whole section (the packaged job lost its caps), and a search-space
    entry could not be added from the command line beside a file's (`sweep.space.lora.alpha=` nested on the
    dot)."""
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  max_train_samples: 100\nsweep:\n  space:\n    lora.r: {choices: [4, 8]}\n")
    cfg = load_config(str(path), ["data={max_length: 64}", "sweep.space.lora.alpha={low: 8, high: 32}"])
    assert cfg.data.max_length == 64 and cfg.data.max_train_samples == 100
    assert set(cfg.sweep.space) == {"lora.r", "lora.alpha"} and cfg.sweep.space["lora.alpha"]["high"] == 32
    cfg = load_config(str(path), ["sweep.space={lora.alpha: {low: 8, high: 32}, lora.r: null}"])
    assert cfg.sweep.space.get("lora.r") is None and cfg.sweep.space["lora.alpha"]["low"] == 8
    # an entry is replaced whole: choices become a range (merged, both were refused together)
    for item in ("sweep.space.lora.r={low: 2, high: 16}", "sweep.space={lora.r: {low: 2, high: 16}}",
                 "sweep={space: {lora.r: {low: 2, high: 16}}}"):
        assert load_config(str(path), [item]).sweep.space["lora.r"] == {"low": 2, "high": 16}, item
    assert "(a method's options are METHOD.KEY, e.g. lora.r=8)" in problems_of(["methods.lora.r=8"])[0]


def test_an_override_is_text_where_yaml_would_read_it_as_something_else():
    """`#` starts a YAML comment, `&` an anchor, `|` a block, `a: b` a mapping: in a key=value they are text."""
    cfg = load_config(None, ["data.train_file=#train.csv", "data.text_column=note #1", "data.label_column=&a",
                             "data.test_file=Review: text", "data.validation_file=|"])
    assert (cfg.data.train_file, cfg.data.text_column, cfg.data.label_column) == ("#train.csv", "note #1", "&a")
    assert (cfg.data.test_file, cfg.data.validation_file) == ("Review: text", "|")
    cfg = load_config(None, ["data.test_file=null", "data.max_train_samples=~", "methods=[full, lora]",
                             "data.text_column='quoted text'"])
    assert cfg.data.test_file is None and cfg.data.max_train_samples is None and cfg.methods == ["full", "lora"]
    assert cfg.data.text_column == "quoted text"


def test_none_spelled_out_is_no_value_except_where_a_field_takes_text(tmp_path):
    """A column or split may be called "none"; a number field has no such value, so there it means null."""
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  label_column: none\n")
    cfg = load_config(config, ["data.text_column=None", "data.max_train_samples=None", "train.eval_every_steps=none"])
    assert (cfg.data.label_column, cfg.data.text_column) == ("none", "None")
    assert cfg.data.max_train_samples is None and cfg.train.eval_every_steps is None


def test_a_config_whose_key_is_a_list_or_which_is_a_folder_is_refused(tmp_path):
    (tmp_path / "job.yaml").write_text("[a, b]: 1\n")
    assert problems_of([], str(tmp_path / "job.yaml")) == [
        f"config: '{tmp_path / 'job.yaml'}' is not valid YAML at line 1, column 1: a key must be a name, not a list"]
    assert problems_of([], str(tmp_path)) == [f"config: '{tmp_path}' is a folder; give a YAML file"]


def test_method_lr_resolution_prefers_explicit_then_method_default_then_train_lr():
    from tunelab.methods.base import get_method

    cfg = load_config(None, ["train.lr=1e-4", "lora.lr=5e-3"])
    assert get_method("lora").resolve_lr(cfg.options("lora"), cfg.train.lr) == 5e-3
    assert get_method("prompt-tuning").resolve_lr(cfg.options("prompt-tuning"), cfg.train.lr) == 3e-2
    assert get_method("full").resolve_lr(cfg.options("full"), cfg.train.lr) == 1e-4


def test_all_problems_are_reported_at_once_with_field_value_and_allowed():
    problems = problems_of(["train.lr=-1", "train.epocs=2", "methods=full,lorra", "train.batch_size=abc",
                            "lora.bias=some"])
    text = "\n".join(problems)
    assert len(problems) == 5
    assert "train.lr: -1.0 is not allowed; must be > 0" in text
    assert "train.epocs: unknown key (did you mean 'epochs'?)" in text
    assert "unknown method 'lorra' (did you mean 'lora'?)" in text
    assert "train.batch_size: expected an integer, got 'abc'" in text
    assert "lora.bias: 'some' is not allowed" in text and "'lora_only'" in text


def test_unknown_top_level_section_gets_a_suggestion():
    assert problems_of(["trian.lr=1"])[0].startswith("trian: unknown key (did you mean 'train'?)")


@pytest.mark.parametrize("override,hint", [
    ("train.learning_rate=1", "train.learning_rate: unknown key (did you mean 'lr'?)"),
    ("train.num_train_epochs=2", "train.num_train_epochs: unknown key (did you mean 'epochs'?)"),
    ("train.per_device_train_batch_size=8", "train.per_device_train_batch_size: unknown key (did you mean 'batch_size'?)"),
    ("lora.rank=8", "lora.rank: unknown key (did you mean 'r'?)"),
    ("lora.lora_alpha=32", "lora.lora_alpha: unknown key (did you mean 'alpha'?)"),
    ("lora.lora_dropout=0.1", "lora.lora_dropout: unknown key (did you mean 'dropout'?)"),
    ("adalora.rank=8", "adalora.rank: unknown key (did you mean 'init_r'?)"),
    ("Train.lr=1", "Train: unknown key (did you mean 'train'?)"),
])
def test_hugging_face_spellings_and_case_slips_get_a_suggestion(override, hint):
    assert any(p.startswith(hint) for p in problems_of([override])), problems_of([override])


def test_an_alias_is_only_suggested_where_the_section_has_that_key():
    problem = next(p for p in problems_of(["llrd.rank=8"]) if p.startswith("llrd.rank"))
    assert "did you mean" not in problem


def test_every_alias_names_a_key_that_exists():
    import dataclasses

    from tunelab.config import sections
    from tunelab.config.schema import ALIASES
    from tunelab.methods.base import registry

    classes = [*sections().values(), *(m.Options for m in registry().values())]
    keys = {f.name for cls in classes for f in dataclasses.fields(cls)}
    assert {name for names in ALIASES.values() for name in names} <= keys


def test_a_method_in_the_wrong_case_is_refused_with_a_suggestion():
    problems = problems_of(["methods=full,LoRA"])
    assert problems[0].startswith("methods: unknown method 'LoRA' (did you mean 'lora'?)")


def test_duplicated_method_is_an_error():
    assert any("'lora' is listed twice" in p for p in problems_of(["methods=lora,full,lora"]))


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1, 2\n")
    assert "not valid YAML at line" in problems_of([], path)[0]


def test_override_without_equals_is_explained():
    assert "expected key=value" in problems_of(["train.lr"])[0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=5))
def test_random_overrides_never_crash(items):
    try:
        load_config(None, items)
    except TunelabInputError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=10))
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                     max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "data", "train", "methods", "lora", "llrd", "x"]), trees,
                       max_size=5))
def test_random_yaml_documents_never_crash(tmp_path_factory, document):
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_config(path)
    except TunelabInputError as exc:
        assert exc.problems


def test_apply_override_refuses_to_descend_into_a_value():
    raw = {"train": 3}
    problems: list[str] = []
    apply_override(raw, "train.lr=1", problems)
    assert problems and "is a value, not a section" in problems[0]


def test_a_tasks_packaged_job_is_optional_but_a_broken_one_is_reported(tmp_path, monkeypatch):
    from tunelab.tasks.base import get_task

    task = get_task("classification")
    monkeypatch.setattr(type(task), "packaged_job", lambda self: tmp_path / "missing.yaml")
    assert load_config(None, ["data.train_file=x.csv"]).data.train_file == "x.csv"  # the config's own defaults
    broken = tmp_path / "classification.yaml"
    broken.write_text("model: [unclosed\n")
    monkeypatch.setattr(type(task), "packaged_job", lambda self: broken)
    with pytest.raises(TunelabInputError, match="classification.yaml' is not valid YAML"):
        load_config(None, [])


def test_an_override_without_equals_in_the_config_position_gets_the_hint(tmp_path):
    assert problems_of([], "train.lr")[0] == ("config: file 'train.lr' does not exist; if it was meant as an "
                                              "override: expected key=value, e.g. train.lr=3e-5")
    assert problems_of([], str(tmp_path / "job.yaml"))[0].endswith("job.yaml' does not exist")


@pytest.fixture
def extra_task(monkeypatch):
    """A task registered from outside tunelab's package, reading one column of its own and sharing one."""
    from dataclasses import dataclass, field

    from tunelab.tasks import base

    @dataclass
    class TaggingColumns(base.TaskColumns):
        tags_column: str | None = field(default=None, metadata={"help": "one tag per word"})
        text_column: str | None = field(default=None, metadata={"help": "the words"})  # as classification's

    class Tagging(base.Task):
        name, description, Columns = "tagging", "words → tags", TaggingColumns
        metrics, default_metric = {"accuracy": base.HIGHER}, "accuracy"

    monkeypatch.setitem(base._REGISTRY, "tagging", Tagging())
    return Tagging


def test_a_new_task_brings_its_own_data_keys(extra_task):
    config = load_config(None, ["task=tagging", "data.train_file=t.jsonl", "data.tags_column=ner",
                                "data.text_column=words"])
    assert (config.data.tags_column, config.data.text_column) == ("ner", "words")
    assert config.to_dict()["data"]["tags_column"] == "ner"
    problems = problems_of(["data.train_file=x.csv", "data.tags_column=ner", "data.tag_column=x"])
    assert "data.tags_column: is for task 'tagging', not 'classification'; remove it or set task" in problems
    assert any(p.startswith("data.tag_column: unknown key (did you mean 'tags_column'?)") for p in problems)


def test_a_task_key_declared_differently_or_shadowing_a_shared_one_is_refused(extra_task, monkeypatch):
    from dataclasses import dataclass, field

    from tunelab.tasks.base import TaskColumns

    @dataclass
    class Clashing(extra_task.Columns):
        text_column: int | None = field(default=None)

    monkeypatch.setattr(extra_task, "Columns", Clashing)
    with pytest.raises(TypeError, match="declare data.text_column with different types or defaults"):
        load_config(None, [])

    @dataclass
    class Shadowing(TaskColumns):
        max_length: int | None = field(default=None)

    monkeypatch.setattr(extra_task, "Columns", Shadowing)
    with pytest.raises(TypeError, match="data.max_length is a key of every task"):
        load_config(None, [])


def test_a_config_pickles_although_its_data_section_is_made_at_run_time():
    import pickle

    config = load_config(None, ["data.text_column=review"])
    assert pickle.loads(pickle.dumps(config)) == config


def test_ls_lists_every_registered_task_with_the_data_keys_it_reads(extra_task, capsys):
    from tunelab.cli import main
    from tunelab.methods.base import registry

    assert main(["ls", "tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[[l.split()[0] for l in lines].index("tagging") + 1].split() == \
        ["reads", "data.tags_column,", "data.text_column"]
    assert main(["ls", "methods"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == sorted(registry())


def test_ls_from_python_gives_what_the_cli_prints(extra_task):
    import tunelab
    from tunelab.methods.base import registry

    tasks = tunelab.ls("tasks")
    assert tasks["tagging"]["data_keys"] == ["data.tags_column", "data.text_column"]
    assert tasks["classification"]["description"] and "data_keys" not in tunelab.ls("methods")["lora"]
    assert list(tunelab.ls("methods")) == sorted(registry())
    with pytest.raises(tunelab.TunelabInputError, match="what: 'models' is not allowed; allowed: methods, tasks"):
        tunelab.ls("models")


def test_a_config_path_holding_an_equals_sign_is_the_config_not_an_override(tmp_path, monkeypatch):
    from tunelab.cli import split_items

    folder = tmp_path / "outputs" / "lr=3e-5"  # Hydra-style run folders
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("train: {lr: 3.0e-5}\n")
    path = str(folder / "config.yaml")
    assert split_items([path, "lora.r=4"]) == (path, ["lora.r=4"])
    monkeypatch.chdir(tmp_path / "outputs")
    assert split_items(["lr=3e-5/config.yaml"]) == ("lr=3e-5/config.yaml", [])
    assert split_items(["train.lr=3e-5", "lora.r=4"]) == (None, ["train.lr=3e-5", "lora.r=4"])


def test_settings_every_run_would_fail_with_are_refused_by_validate():
    """prefix tuning cannot checkpoint (its prefix is the cache checkpointing turns off); a metric scored on
    generated answers cannot pick the best checkpoint when no answers are generated."""
    problems = problems_of(["methods=prefix-tuning,lora", "train.gradient_checkpointing=true"])
    assert problems == [problem for problem in problems if problem.startswith("train.gradient_checkpointing: ")]
    assert "method 'prefix-tuning' cannot train with it: transformers turns the key/value cache off" in problems[0]
    problems = problems_of(["task=causal-lm", "train.metric_for_best=exact_match", "sweep.metric=token_f1",
                            "causal-lm.generation_samples=0"])
    assert problems == [f"{key}: {metric!r} is scored on generated answers, and causal-lm.generation_samples is 0; "
                        "set it above 0 or pick loss"
                        for key, metric in (("train.metric_for_best", "exact_match"), ("sweep.metric", "token_f1"))]


def test_messages_for_a_task_without_options_and_a_list_inside_methods_say_one_thing_each():
    assert problems_of(["classification.foo=1"]) == ["classification.foo: unknown key; classification has no options"]
    assert problems_of(["methods=[full, [lora]]"]) == ["methods[1]: expected a string, got ['lora']"]


def test_the_packaged_jobs_row_caps_stay_with_its_packaged_data():
    """`tunelab compare data.train_file=mine.csv` trained on 2,000 of the user's rows, silently: the caps are
    sized for the packaged set."""
    assert load_config(None, []).data.max_train_samples == 2000
    mine = load_config(None, ["data.train_file=mine.csv"]).data
    assert (mine.max_train_samples, mine.max_eval_samples) == (None, None)
    capped = load_config(None, ["data.train_file=mine.csv", "data.max_eval_samples=50"]).data
    assert (capped.max_train_samples, capped.max_eval_samples) == (None, 50)
    assert load_config(None, ["data.dataset=someone/reviews"]).data.max_train_samples is None
    assert load_config(None, ["task=causal-lm", "data.dataset=chatterbot-english"]).data.max_train_samples == 800


def test_an_empty_text_in_a_config_file_is_refused_not_read_as_the_default(tmp_path):
    """`text_column: ""` read as "not given" and named the default column 'text' in every later message."""
    from tunelab.config import config_and_problems

    path = tmp_path / "c.yaml"
    path.write_text('data:\n  text_column: ""\nmodel:\n  name_or_path: "  "\n')
    _, problems = config_and_problems(str(path), [])
    assert problems == [
        "model.name_or_path: an empty text is not allowed; leave the key out (or null) for its default",
        "data.text_column: an empty text is not allowed; leave the key out (or null) for its default"]
