"""`{{name}}`: a Hangar tool written in Python.

As written it counts the lines of a text file in the session's working
directory; change SCHEMA, the description and `run` to make it yours. Build
it with `hangar plugin build` (componentize-py against `wit/`).
"""

import json
import os

from wit_world import exports
from wit_world.imports.types import ToolCall, ToolOutput, ToolSpec

NAME = "{{name}}"  # must equal `name` in {{name}}.plugin.toml

# What the model reads to decide how to call the tool.
SCHEMA = {
    "type": "object",
    "properties": {
        "path": {"type": "string", "description": "Path of a text file, relative to the working directory"},
    },
    "required": ["path"],
    "additionalProperties": False,
}


class ToolApi(exports.ToolApi):
    def spec(self) -> ToolSpec:
        return ToolSpec(
            name=NAME,
            description="Counts the lines of a text file in the working directory.",
            input_schema=json.dumps(SCHEMA),
        )

    def invoke(self, call: ToolCall) -> ToolOutput:
        # A failure the model can act on is an is_error output, never an
        # exception: an uncaught exception traps, and the model then only
        # learns that the plugin crashed.
        try:
            return ToolOutput(text=run(call), is_error=False)
        except ToolError as err:
            return ToolOutput(text=str(err), is_error=True)


class ToolError(Exception):
    pass


def run(call: ToolCall) -> str:
    try:
        args = json.loads(call.input)
    except ValueError as err:
        raise ToolError(f"invalid input: {err}")
    path = args.get("path") if isinstance(args, dict) else None
    if not isinstance(path, str) or not path:
        raise ToolError("invalid input: `path` must be a non-empty string")
    if not call.work_dir:
        raise ToolError("this session has no working directory")
    # Relative paths are taken from the working directory; the sandbox only
    # lets the tool open files inside it.
    try:
        with open(os.path.join(call.work_dir, path), "rb") as f:
            lines = f.read().count(b"\n")
    except OSError as err:
        raise ToolError(f"cannot read `{path}`: {err.strerror or err}")
    return f"{path}: {lines} lines"
