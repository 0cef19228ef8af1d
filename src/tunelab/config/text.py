"""The config's text: YAML files (a key written twice refused; numbers, booleans and dates keep their text) and
`key=value` overrides, read the same way."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .schema import ScalarText


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping: PyYAML keeps the last one, so a second
    `train:` section would silently drop everything the first one set."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, YAML's own way of combining
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (list, dict)):  # `[a, b]: 1`: YAML allows it, no config key is one
                raise yaml.constructor.ConstructorError(None, None, f"a key must be a name, not a {type(key).__name__}",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is written twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# numbers, booleans and dates keep their text (ScalarText), as overrides do: `revision: 1.10` is "1.10"
for _tag in ("int", "float", "bool", "timestamp"):
    UniqueKeyLoader.add_constructor(
        f"tag:yaml.org,2002:{_tag}",
        lambda loader, node, read=yaml.SafeLoader.yaml_constructors[f"tag:yaml.org,2002:{_tag}"]:
            ScalarText(node.value, read(loader, node)))


def read_yaml(path: Path, problems: list[str]) -> dict:
    if path.is_dir():
        problems.append(f"config: {str(path)!r} is a folder; give a YAML file")
        return {}
    if not path.is_file():
        # `tunelab validate train.lr` (the `=` forgotten) reaches here as a config file's name
        looks_like_override = re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)+", str(path)) and \
            path.suffix not in (".yaml", ".yml")
        hint = "; if it was meant as an override: expected key=value, e.g. train.lr=3e-5" if looks_like_override else ""
        problems.append(f"config: file {str(path)!r} does not exist{hint}")
        return {}
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.append(f"config: {str(path)!r} is not valid YAML{where}: {getattr(exc, 'problem', exc)}")
        return {}
    except UnicodeDecodeError:
        problems.append(f"config: {str(path)!r} is not UTF-8 text")
        return {}
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"config: {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
        return {}
    return raw


def override_value(text: str) -> Any:
    """An override's value, read as a config file's value is (numbers, booleans and dates keep their text, as
    ScalarText; `[a, b]` and `{k: v}` are a list and a mapping; null, ~ or nothing is null). Text that YAML
    would read as something else than itself is kept as written: `#train.csv` is a file name, not a comment
    (null), `note #1` keeps its `#1`, `&a`, `|` and `Review: text` are text, not an anchor, a block or a mapping."""
    stripped = text.strip()
    try:
        value = yaml.load(text, Loader=UniqueKeyLoader) if stripped else None
    except yaml.YAMLError:
        return text
    if stripped[:1] in ("[", "{", "'", '"') or isinstance(value, ScalarText):
        return value
    if value is None:
        return None if stripped.lower() in ("", "null", "~") else text
    return value if value == stripped else text


def apply_override(raw: dict, item: str, problems: list[str]) -> None:
    """Apply one `dotted.key=value`; the value is read as YAML (so 3, 1.5, true, [a, b] work)."""
    if not isinstance(item, str):
        problems.append(f"override {item!r}: expected key=value text, e.g. train.lr=3e-5")
        return
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        problems.append(f"override {item!r}: expected key=value, e.g. train.lr=3e-5")
        return
    value = override_value(text)
    node = raw
    parts = key.split(".")
    if parts[:2] == ["sweep", "space"] and len(parts) > 2:  # a space's keys are dotted names themselves
        parts = ["sweep", "space", ".".join(parts[2:])]
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            hint = " (a method's options are METHOD.KEY, e.g. lora.r=8)" if part == "methods" else ""
            problems.append(f"override {item!r}: {part!r} is a value, not a section{hint}")
            return
        node = child
    node[parts[-1]] = merged(node.get(parts[-1]), value, tuple(parts))


def merged(old, new, where: tuple[str, ...] = ()):
    """A mapping given for a section adds to what the section holds (`data={max_length: 64}` keeps the other
    data keys; `sweep.space={lora.alpha: ...}` adds a searched option beside the file's). A search-space entry
    is replaced whole (choices for a range, a range without the file's `log`); set to null it is removed.
    Anything else replaces."""
    if not (isinstance(old, dict) and isinstance(new, dict)) or where[:2] == ("sweep", "space") and len(where) > 2:
        return new
    return {**old, **{key: merged(old.get(key), value, (*where, str(key))) for key, value in new.items()}}
