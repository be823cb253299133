"""The other side of the MCP figure (benches/features.rs): a Streamable HTTP
MCP server written with the official MCP Python SDK (`mcp` on PyPI) whose
one tool, `read`, reads a file under ROOT with a plain `open`: no sandbox.

    python3 mcp_read_server.py PORT ROOT    # serves http://127.0.0.1:PORT/mcp
"""

import os
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

port, root = int(sys.argv[1]), sys.argv[2]
server = MCPServer("bench-read")


@server.tool()
def read(filePath: str) -> str:
    """Reads a text file under the server's root."""
    with open(os.path.join(root, filePath), encoding="utf-8") as f:
        return f.read()


if __name__ == "__main__":
    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=port, log_level="warning")
