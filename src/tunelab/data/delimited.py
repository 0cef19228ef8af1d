"""CSV and TSV files read as the text their writers meant.

TSV has two conventions for double quotes: GLUE-style files and most hand-written ones take them literally
(`a 5" box`, `"Hi," he said`), while pandas, R and spreadsheets wrap a field in quotes and double the quotes
inside it. Read with CSV quoting, a literal quote at the start of a field opens a quoted field that runs to the
next quote, silently merging every row in between into one text. So a TSV is read with CSV quoting only where
its quotes are CSV quoting, or where it needs it (a quoted field holding a tab or a line break)."""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pandas as pd

# Python's csv module refuses a field over 128 KiB (a long document in one cell: "field larger than field
# limit"), which pandas' reader does not; the limit guards nothing tunelab needs
csv.field_size_limit(2**31 - 1)

# a whole field in quotes, with any quote inside it doubled: what a CSV writer makes of a field
CSV_QUOTED_FIELD = re.compile(r'"(?:[^"]|"")*"')


def read_csv_as_text(path: Path, skip_blank_lines: bool = True) -> pd.DataFrame:
    """Every field as the text it is: CSV has no types, and guessing them loses what users wrote (labels "01"
    and "02" would become 1 and 2, one empty field would turn a column of 3s and 7s into 3.0 and 7.0). Only
    an empty field is missing; "NA", "None" and "null" are text (a class may be called "NA"). A blank line is
    skipped, or with `skip_blank_lines=False` a row of missing values (an empty input, where rows must line up)."""
    sep, source, quoting = separator(path), path, csv.QUOTE_MINIMAL
    if sep == "\t":  # read once: its text decides the quoting and is what is parsed
        text = path.read_text(encoding="utf-8-sig")
        source, quoting = io.StringIO(text), tsv_quoting(text)
    frame = pd.read_csv(source, sep=sep, dtype=str, keep_default_na=False, na_values=[""], quoting=quoting,
                        skip_blank_lines=skip_blank_lines)
    if frame.empty and not len(frame.columns):
        raise pd.errors.EmptyDataError("no columns")
    if not isinstance(frame.index, pd.RangeIndex):  # pandas took rows' first field as their index: see below
        raise ValueError(longer_than_header(source if sep == "\t" else path, sep, quoting))
    twice = repeated_names(path, sep)
    if twice:  # pandas renames the second "label" to "label.1": which one a run reads would be a guess
        raise ValueError(f"column {twice[0]!r} is named twice in the header")
    return frame


def longer_than_header(source, sep: str, quoting: int) -> str:
    """Where the data rows have one field more than the header, pandas silently reads their first field as the
    row's index: a text with an unquoted separator in the first data row lost its start and shifted its label
    into the text column. The first such line, and what to do."""
    text = source.getvalue() if isinstance(source, io.StringIO) else source.read_text(encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, quoting=quoting)
    header = next(reader, [])
    line, fields = next(((reader.line_num, len(row)) for row in reader if len(row) > len(header)), (0, 0))
    quoted = "a tab needs quotes" if sep == "\t" else 'a comma needs quotes ("like, this")'
    return (f"line {line} has {fields} fields but the header has {len(header)}: a field that contains {quoted}; if "
            "the first column holds row names, give it a name in the header")


def repeated_names(path: Path, sep: str) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        header = next(csv.reader(fh, delimiter=sep), [])
    return sorted({name for name in header if name and header.count(name) > 1})


def separator(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def tsv_quoting(text: str) -> int:
    """csv.QUOTE_NONE where the file's quotes are literal text, csv.QUOTE_MINIMAL where they are CSV quoting:
    split at tabs alone, every line has the header's number of fields (no quoted field holds a tab or a line
    break) and some field with a quote is not one whole CSV-quoted field."""
    if '"' not in text:
        return csv.QUOTE_MINIMAL  # nothing to decide
    rows = [row for row in csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    if len({len(row) for row in rows}) > 1:
        return csv.QUOTE_MINIMAL
    literal = any('"' in field and not CSV_QUOTED_FIELD.fullmatch(field) for row in rows for field in row)
    return csv.QUOTE_NONE if literal else csv.QUOTE_MINIMAL


def not_utf8(path: Path) -> str:
    """Where a file stops being UTF-8, counted in the file's bytes (a reader decoding in chunks, or past a
    byte-order mark, reports an offset of its own)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return f"is not UTF-8 text (bad byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line})"
    return "is not UTF-8 text"
