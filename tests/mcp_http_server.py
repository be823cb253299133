"""A Streamable HTTP MCP server for tests/mcp.rs, written with the official
MCP Python SDK (`mcp` on PyPI): `python3 mcp_http_server.py PORT` serves
`http://127.0.0.1:PORT/mcp`. Every request must carry `x-token: TOKEN`
(argv[2]), the header Hangar stores sealed and sends for the tenant.
"""

import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

port, token = int(sys.argv[1]), sys.argv[2]
server = MCPServer("hangar-test-http")


@server.tool()
def add(a: int, b: int) -> str:
    """Adds two numbers."""
    return str(a + b)


def checked(app):
    async def guard(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if headers.get(b"x-token") != token.encode():
                await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]})
                await send({"type": "http.response.body", "body": b"missing x-token"})
                return
        await app(scope, receive, send)

    return guard


if __name__ == "__main__":
    uvicorn.run(checked(server.streamable_http_app()), host="127.0.0.1", port=port, log_level="warning")
