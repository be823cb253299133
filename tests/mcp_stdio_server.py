"""A stdio MCP server for tests/mcp.rs, written with the official MCP Python
SDK (`mcp` on PyPI). Hangar starts it per session, confined like `bash`.

Tools: echo (text and the directory it runs in), peek (reads any path:
the sandbox must refuse one outside the work dir), picture (an image
block), fail (an error result), die (the server crashes), spawn (leaves a process behind, which must
not outlive the server's stop).
"""

import os
import subprocess

from mcp.server.mcpserver import Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("hangar-test-stdio")


@server.tool()
def echo(text: str) -> str:
    """Returns the text and the working directory."""
    return f"{text} from {os.getcwd()}"


@server.tool()
def peek(path: str) -> str:
    """Reads a file."""
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        # A ToolError's message reaches the client (others are hidden).
        raise ToolError(f"cannot read {path}: {e.strerror}") from e


@server.tool()
def picture() -> Image:
    """A tiny PNG."""
    return Image(data=b"\x89PNG\r\n\x1a\n" + b"\0" * 2048, format="png")


@server.tool()
def fail() -> str:
    """Always fails."""
    raise ToolError("boom: this tool always fails")


@server.tool()
def die() -> str:
    """Exits mid-call, as a crashing server does."""
    os._exit(1)


@server.tool()
def spawn(marker: str) -> str:
    """Starts a background process that would outlive the call."""
    child = subprocess.Popen(["sleep", marker], start_new_session=True)
    return f"started {child.pid}"


if __name__ == "__main__":
    server.run()
