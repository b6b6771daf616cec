"""Reading JSON / JSONL data files record by record, with one error shape and an opt-in counted skip.

Every loader in the repository reports a bad record with :class:`RecordError`, whose message has one shape::

    <file>:<record id or line>: <field>: <what is wrong>, <what was expected>
    train.json:problem 17: choices: missing, expected a list of strings
    data.jsonl:line 3: json: Expecting ',' delimiter (column 12), expected one JSON value per line

Files are decoded as UTF-8; a UTF-8 byte-order mark is tolerated; any other encoding is an error naming the
file and the byte offset of the first undecodable byte.

By default the first bad record stops loading (``on_bad_record="error"``). With ``on_bad_record="skip"``
a :class:`BadRecordPolicy` drops bad records instead, counting each under its cause in the same
:class:`~mmr_core.data.SkipCounter` the WebDataset reader uses (so JSON records and shards share one skip
summary and one pair of limits), and raises :class:`~mmr_core.data.TooManySkipsError` when more than
``max_skips`` records, or more than ``max_fraction`` of them, were bad.

Typical loader::

    policy = BadRecordPolicy(on_bad_record="skip", max_fraction=0.01)
    items = read_json_list(path, id_field="id")            # [(record id, raw record), ...]
    problems = parse_records(items, parse_problem, policy)  # parse_problem(view: RecordView) -> Problem
    log(policy.summary())                                    # 'skipped 2 of 500 (0.40%): missing_field=2'
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from mmr_core.io.skips import SkipCounter, TooManySkipsError

__all__ = [
    "BadRecordPolicy",
    "RecordError",
    "RecordView",
    "check_text",
    "finite_numbers",
    "parse_records",
    "read_json",
    "read_json_list",
    "read_jsonl",
    "read_text",
]

T = TypeVar("T")

_BOM = b"\xef\xbb\xbf"


class RecordError(ValueError):
    """One bad record (or one bad spot of a data file), in the repository's one message shape.

    Attributes:
        file: The data file (``"<memory>"`` for records handed over as Python objects).
        record: The record's id, or ``"line N"`` / ``"record N"`` where there is no id.
        field: The field that is wrong (``"json"`` / ``"encoding"`` for file-level problems).
        problem: What is wrong.
        expected: What was expected instead.
        cause: The skip reason the record is counted under (a :data:`~mmr_core.data.SKIP_REASONS` entry).
    """

    def __init__(self, file: str | Path, record: str | int, field: str, problem: str, expected: str,
                 cause: str = "bad_value") -> None:
        super().__init__(f"{file}:{record}: {field}: {problem}, {expected}")
        self.file, self.record, self.field = str(file), str(record), field
        self.problem, self.expected, self.cause = problem, expected, cause


# -- file decoding ----------------------------------------------------------------------------------------------
def read_text(path: str | Path) -> str:
    """The file's text, decoded as UTF-8 (a leading byte-order mark is dropped).

    Raises:
        FileNotFoundError: The file does not exist.
        RecordError: A byte sequence is not UTF-8 (cause ``"encoding"``), naming its line and byte offset.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    return _decode(path.read_bytes(), path, 0)


def _decode(data: bytes, path: str | Path, base_offset: int = 0, first_line: int = 1) -> str:
    """UTF-8 text of ``data`` (which starts ``base_offset`` bytes, line ``first_line``, into ``path``), BOM
    tolerated at the start of the file."""
    start = len(_BOM) if base_offset == 0 and data.startswith(_BOM) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = first_line + data.count(b"\n", 0, offset)
        raise RecordError(path, f"line {line}", "encoding",
                          f"byte 0x{data[offset]:02x} at byte offset {base_offset + offset} is not valid UTF-8",
                          "expected UTF-8 text (a byte-order mark is allowed)", cause="encoding") from None


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path`` (UTF-8, BOM tolerated).

    Raises:
        RecordError: Undecodable bytes (cause ``"encoding"``) or invalid JSON (cause ``"bad_json"``,
            naming the line and column).
    """
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(path, f"line {e.lineno}", "json", f"{e.msg} (column {e.colno})",
                          "expected a valid JSON document", cause="bad_json") from None


def read_json_list(path: str | Path, id_field: str | None = None, key: str | None = None
                   ) -> list[tuple[str, Any]]:
    """The records of a JSON file holding a list (or a dict of records), each with its id.

    Args:
        path: The file.
        id_field: Field whose value names a record in errors (``None``: its position, ``"record 3"``).
        key: Top-level key holding the list (``None``: the document itself is the list or a dict of
            records, whose keys are then the ids).

    Returns:
        ``[(record id, raw record), ...]`` in file order.
    """
    doc = read_json(path)
    where = key or "<document>"
    if key is not None:
        if not isinstance(doc, dict) or key not in doc:
            raise RecordError(path, "<document>", key, "missing", "expected a top-level object holding it",
                              cause="missing_field")
        doc = doc[key]
    if isinstance(doc, dict):
        return [(str(k), v) for k, v in doc.items()]
    if not isinstance(doc, list):
        raise RecordError(path, "<document>", where, f"is a JSON {_type_name(doc)}",
                          "expected a list of records", cause="wrong_type")
    out = []
    for i, rec in enumerate(doc):
        rid = rec.get(id_field) if id_field and isinstance(rec, dict) else None
        out.append((f"{id_field} {rid}" if rid is not None else f"record {i}", rec))
    return out


def read_jsonl(path: str | Path, policy: BadRecordPolicy | None = None) -> list[tuple[str, Any]]:
    """The records of a JSON-lines file as ``[("line N", value), ...]``; blank lines are ignored.

    A line that is not UTF-8 or not JSON is a :class:`RecordError` (handed to ``policy``, which raises or
    counts a skip; without a policy it raises).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    policy = policy or BadRecordPolicy()
    data = path.read_bytes()
    out: list[tuple[str, Any]] = []
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line_offset, offset = offset, offset + len(raw) + 1
        try:
            text = _decode(raw, path, line_offset, number)
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError(path, f"line {number}", "json", f"{e.msg} (column {e.colno})",
                                  "expected one JSON value per line", cause="bad_json") from None
        except RecordError as err:
            policy.handle(err)
            continue
        out.append((f"line {number}", value))
    return out


# -- one record's fields ------------------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class RecordView:
    """One raw record with its file and id: typed field access that raises :class:`RecordError`.

    Args:
        raw: The decoded JSON value of the record (must be an object).
        file: The data file it came from.
        record: Its id (or ``"line N"``).
    """

    def __init__(self, raw: Any, file: str | Path, record: str) -> None:
        self.file, self.record = str(file), record
        if not isinstance(raw, dict):
            raise self.error("<record>", f"is a JSON {_type_name(raw)}", "expected an object", "wrong_type")
        self.raw = raw

    def error(self, field: str, problem: str, expected: str, cause: str = "bad_value") -> RecordError:
        """A :class:`RecordError` for ``field`` of this record (to be raised by the caller)."""
        return RecordError(self.file, self.record, field, problem, expected, cause)

    def has(self, field: str) -> bool:
        return field in self.raw and self.raw[field] is not None

    def get(self, field: str, types: type | tuple[type, ...], expected: str, default: Any = ...) -> Any:
        """The field's value, checked against ``types`` (``bool`` never passes for ``int`` or ``float``).

        Args:
            field: Field name.
            types: Accepted Python types of the decoded JSON value.
            expected: Words for the error, e.g. ``"a list of 4 numbers"``.
            default: Returned when the field is absent or null; without it, absence is an error.
        """
        value = self.raw.get(field)
        if value is None:
            if default is not ...:
                return default
            problem = "missing" if field not in self.raw else "is null"
            raise self.error(field, problem, f"expected {expected}", "missing_field")
        types = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise self.error(field, f"is a {_type_name(value)} {_short(value)}", f"expected {expected}",
                             "wrong_type")
        return value

    def integer(self, field: str, default: Any = ...) -> int:
        """An integer field (JSON ``true`` / ``false`` and ``1.0`` are refused)."""
        return self.get(field, int, "an integer", default)

    def text(self, field: str, default: Any = ..., allow_empty: bool = False) -> str:
        """A string field; empty strings (unless allowed) and lone surrogates (text no tokenizer encodes) are
        errors."""
        value = self.get(field, str, "a string", default)
        if value is default:
            return value
        check_text(value, self, field, allow_empty)
        return value

    def numbers(self, field: str, length: int | None = None, default: Any = ...) -> list[float]:
        """A list of finite numbers (of exactly ``length`` entries when given)."""
        want = f"a list of {length} finite numbers" if length else "a list of finite numbers"
        value = self.get(field, list, want, default)
        if value is default:
            return value
        return finite_numbers(value, self, field, length)


def check_text(value: str, where: RecordView, field: str, allow_empty: bool = False) -> None:
    """Raise :class:`RecordError` for an empty string (unless allowed) or one holding a lone surrogate."""
    if not value.strip() and not allow_empty:
        raise where.error(field, "is empty", "expected non-blank text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise where.error(field, f"holds a lone surrogate \\u{ord(value[e.start]):04x} at character {e.start}",
                          "expected text that UTF-8 can encode") from None


def finite_numbers(values: Sequence[Any], where: RecordView, field: str, length: int | None = None
                   ) -> list[float]:
    """``values`` as floats, checking each is a real, finite number and the count is ``length``."""
    want = f"a list of {length} finite numbers" if length else "a list of finite numbers"
    if length is not None and len(values) != length:
        raise where.error(field, f"has {len(values)} numbers {_short(values)}", f"expected {want}", "wrong_type")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise where.error(field, f"entry {i} is a {_type_name(v)} {_short(v)}", f"expected {want}",
                              "wrong_type")
        if not math.isfinite(v):
            raise where.error(field, f"entry {i} is {v}", f"expected {want}")
        out.append(float(v))
    return out


# -- the skip policy ---------------------------------------------------------------------------------------------
class BadRecordPolicy:
    """Raise on the first bad record (default) or skip bad records, counted by cause, within limits.

    Args:
        on_bad_record: ``"error"`` (raise the :class:`RecordError`) or ``"skip"`` (count it and go on).
        max_skips: With ``"skip"``: raise :class:`~mmr_core.data.TooManySkipsError` once more records than
            this were skipped (``None``: no count limit).
        max_fraction: With ``"skip"``: raise once more than this fraction of the records seen were skipped
            (checked while reading after ``min_records`` records, and over all records in :meth:`finish`).
        min_records: Records seen before the fraction is checked while reading.
        counter: An existing :class:`~mmr_core.data.SkipCounter` to count into (e.g. the shard reader's),
            whose own limits then apply while reading.
    """

    def __init__(self, on_bad_record: Literal["error", "skip"] = "error", max_skips: int | None = None,
                 max_fraction: float | None = 0.05, min_records: int = 100,
                 counter: SkipCounter | None = None) -> None:
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        self.on_bad_record = on_bad_record
        self.max_fraction = max_fraction
        self.counter = counter or SkipCounter(max_skips=max_skips, max_fraction=max_fraction,
                                              min_samples=min_records)

    def handle(self, err: RecordError) -> None:
        """Raise ``err`` (mode ``"error"``) or count and log it as a skip under ``err.cause``."""
        if self.on_bad_record == "error":
            raise err
        self.counter.skip(err.cause, err.file, err.record, err)

    def accept(self, n: int = 1) -> None:
        """Count ``n`` good records (the denominator of the skipped fraction)."""
        self.counter.delivered(n)

    def finish(self) -> str:
        """Check the skipped fraction over everything read (however few records) and return the summary."""
        skipped = self.counter.num_skipped
        seen = skipped + self.counter.num_delivered
        if self.max_fraction is not None and seen and skipped / seen > self.max_fraction:
            raise TooManySkipsError(f"{skipped} of {seen} records skipped ({skipped / seen:.1%}) exceeds "
                                    f"max_fraction={self.max_fraction:.1%} ({self.counter.counts()})")
        return self.summary()

    def counts(self) -> dict[str, int]:
        """Skips per cause, e.g. ``{"missing_field": 2}``."""
        return self.counter.counts()

    @property
    def num_skipped(self) -> int:
        return self.counter.num_skipped

    def summary(self) -> str:
        """One line for the run log and metrics, e.g. ``skipped 2 of 500 (0.40%): missing_field=2``."""
        return self.counter.summary()


def parse_records(items: Iterable[tuple[str, Any]], parse: Callable[[RecordView], T],
                  policy: BadRecordPolicy | None = None, file: str | Path = "<memory>") -> list[T]:
    """Validate and convert every record; bad ones raise or are skipped as ``policy`` says.

    Args:
        items: ``(record id, raw record)`` pairs (from :func:`read_jsonl` / :func:`read_json_list`).
        parse: Builds the package's record from a :class:`RecordView`, raising :class:`RecordError`.
        policy: The bad-record policy (default: raise on the first bad record).
        file: The data file the records came from.

    Returns:
        The parsed records, in order, without the skipped ones. :meth:`BadRecordPolicy.finish` has been
        called, so the fraction limit holds over the whole file.
    """
    policy = policy or BadRecordPolicy()
    out = []
    for record_id, raw in items:
        try:
            out.append(parse(RecordView(raw, file, record_id)))
        except RecordError as err:
            policy.handle(err)
            continue
        policy.accept()
    policy.finish()
    return out
