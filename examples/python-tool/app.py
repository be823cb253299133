"""`csv_stats`: a Hangar tool written in Python.

Summarises a CSV file in the session's working directory: its columns,
its row count, and for every column whose values are all numbers the
minimum, maximum and mean. Built into a WebAssembly component with
componentize-py against Hangar's WIT (world `hangar:plugin/tool`).
"""

import csv
import json
import os
import statistics

from wit_world import exports
from wit_world.imports.types import ToolCall, ToolOutput, ToolSpec

NAME = "csv_stats"

SCHEMA = {
    "type": "object",
    "properties": {
        "path": {
            "type": "string",
            "description": "Path of the CSV file, relative to the working directory",
        },
        "delimiter": {
            "type": "string",
            "description": "Field separator (default: guessed from the file)",
        },
    },
    "required": ["path"],
    "additionalProperties": False,
}

# The model reads the answer: keep it short even for very wide files.
MAX_COLUMNS = 50


class ToolApi(exports.ToolApi):
    def spec(self) -> ToolSpec:
        return ToolSpec(
            name=NAME,
            description="Summarises a CSV file in the working directory: column names, "
            "row count, and min/max/mean of every numeric column.",
            input_schema=json.dumps(SCHEMA),
        )

    def invoke(self, call: ToolCall) -> ToolOutput:
        # A failure the model can act on is an is_error output, never an
        # exception: an uncaught exception traps, and the model then only
        # learns that the plugin crashed.
        try:
            return ToolOutput(text=summarise(call), is_error=False)
        except ToolError as err:
            return ToolOutput(text=str(err), is_error=True)


class ToolError(Exception):
    pass


def summarise(call: ToolCall) -> str:
    try:
        args = json.loads(call.input)
    except ValueError as err:
        raise ToolError(f"invalid input: {err}")
    path = args.get("path")
    if not isinstance(path, str) or not path:
        raise ToolError("invalid input: `path` must be a non-empty string")
    if not call.work_dir:
        raise ToolError("this session has no working directory")
    # Relative paths are taken from the working directory. Nothing else is
    # checked here: the sandbox only lets the tool open files inside it.
    full = os.path.join(call.work_dir, path)
    try:
        with open(full, newline="", encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ToolError(f"cannot read `{path}`: {err.strerror or err}")
    except UnicodeDecodeError:
        raise ToolError(f"`{path}` is not UTF-8 text")

    delimiter = args.get("delimiter")
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
    if not rows:
        raise ToolError(f"`{path}` is empty")
    header, body = rows[0], rows[1:]

    lines = [f"{path}: {len(body)} rows, {len(header)} columns"]
    for index, name in enumerate(header[:MAX_COLUMNS]):
        values = [row[index] for row in body if index < len(row) and row[index].strip()]
        numbers = to_numbers(values)
        if numbers:
            mean = statistics.fmean(numbers)
            lines.append(f"- {name}: numeric, min {fmt(min(numbers))}, max {fmt(max(numbers))}, mean {fmt(mean)}")
        else:
            distinct = len(set(values))
            lines.append(f"- {name}: text, {distinct} distinct values")
    if len(header) > MAX_COLUMNS:
        lines.append(f"... and {len(header) - MAX_COLUMNS} more columns")
    return "\n".join(lines)


def to_numbers(values):
    """The values as floats, or None when any of them is not a number."""
    if not values:
        return None
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:.4g}"
