"""Task data from local TSV/CSV/JSONL files (or a hub dataset when online), as plain lists.

Every command that reads text uses :func:`read_table`; bad files fail with one-line InputErrors.
Local files are read as UTF-8 with or without a byte-order mark, and every reader treats a value
alike (:func:`clean_value`: strings stripped of surrounding whitespace), so the same rows give the
same values from a .tsv, a .csv or a .jsonl.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from mlpfuse.errors import EnvironmentProblem, InputError

SUFFIXES = {".tsv": "\t", ".csv": ",", ".jsonl": None, ".json": None}
ENCODING = "utf-8-sig"  # UTF-8; a leading byte-order mark (as some editors write) is dropped, not read as text


@dataclass
class Table:
    """Columns of a data file: ``columns[name]`` is a list of values, one per row."""

    path: str
    columns: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def column(self, name: str) -> list:
        """The values of ``name``; an InputError naming the available columns if absent."""
        if name not in self.columns:
            raise InputError(f"{self.path} has no column {name!r}; columns: {', '.join(self.columns) or 'none'}")
        return self.columns[name]

    def texts(self, column: str, pair_column: str | None = None) -> list:
        """Strings of ``column`` (or (text, pair) tuples when ``pair_column`` is given)."""
        first = [str(v) for v in self.column(column)]
        if pair_column is None:
            return first
        return list(zip(first, (str(v) for v in self.column(pair_column))))


def encode_texts(tokenizer, texts: list, max_length: int) -> dict:
    """Tokenise strings (or (text, pair) tuples) into padded, truncated PyTorch tensors."""
    if texts and isinstance(texts[0], tuple):
        first, second = zip(*texts)
        return dict(tokenizer(list(first), list(second), padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt"))
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def clean_value(value):
    """A cell as every reader returns it: a string without surrounding whitespace; other values as they are."""
    return value.strip() if isinstance(value, str) else value


def read_table(source: str, limit: int | None = None, split: str = "train") -> Table:
    """Read a local .tsv/.csv/.jsonl file (first ``limit`` rows), or ``hub:NAME[:CONFIG]`` via datasets."""
    if source.startswith("hub:"):
        return _read_hub(source[4:], limit, split)
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(f"data file {source} not found")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"data file {source}: unsupported format {suffix or '(none)'}; use .tsv, .csv or .jsonl")
    try:
        rows = _read_jsonl(path, limit) if SUFFIXES[suffix] is None else _read_delimited(path, SUFFIXES[suffix], limit)
    except (UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise InputError(f"data file {source} cannot be parsed: {str(exc).splitlines()[0]}") from None
    if not rows:
        raise InputError(f"data file {source} has no data rows")
    names = list(rows[0])
    return Table(str(source), {name: [row.get(name) for row in rows] for name in names})


def _read_delimited(path: Path, delimiter: str, limit: int | None) -> list[dict]:
    rows = []
    with open(path, newline="", encoding=ENCODING) as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        if not reader.fieldnames:
            return []
        for row in reader:
            rows.append({k: clean_value(v) for k, v in row.items() if k is not None})
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = []
    with open(path, encoding=ENCODING) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ValueError(f"line {number} is not JSON") from None
            if not isinstance(row, dict):
                raise ValueError(f"line {number} is not a JSON object")
            rows.append({k: clean_value(v) for k, v in row.items()})
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _read_hub(name: str, limit: int | None, split: str) -> Table:
    try:
        import datasets
    except ImportError:
        raise EnvironmentProblem("reading hub datasets needs the 'datasets' package") from None
    dataset_name, _, config = name.partition(":")
    try:
        data = datasets.load_dataset(dataset_name, config or None, split=split)
    except Exception as exc:  # offline and missing datasets surface as many exception types
        raise EnvironmentProblem(f"cannot load dataset {name!r} from the hub ({type(exc).__name__}); use a local file") from None
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return Table(f"hub:{name}", {column: [clean_value(v) for v in data[column]] for column in data.column_names})
