"""An MCP client for tests/mcp.rs: the official Python SDK (`mcp` on PyPI)
over Streamable HTTP. Reads a plan (JSON) from argv[1]:

    {"url": ..., "token": ..., "calls": [{"name": ..., "arguments": {...}}],
     "elicitation": null | "accept" | "decline"}

and prints what it saw as one JSON object on stdout:

    {"tools": [{"name", "description", "inputSchema"}],
     "calls": [{"name", "isError", "text"}], "asked": [message, ...]}
"""

import asyncio
import json
import sys

from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


async def main(plan):
    asked = []

    async def elicit(context, params):
        asked.append(params.message)
        return types.ElicitResult(action=plan["elicitation"], content={} if plan["elicitation"] == "accept" else None)

    callback = elicit if plan.get("elicitation") else None
    headers = {"Authorization": f"Bearer {plan['token']}"}
    async with create_mcp_http_client(headers=headers) as http:
        async with streamable_http_client(plan["url"], http_client=http) as (read, write):
            async with ClientSession(read, write, elicitation_callback=callback) as session:
                await session.initialize()
                listed = await session.list_tools()
                tools = [{"name": t.name, "description": t.description, "inputSchema": t.input_schema} for t in listed.tools]
                calls = []
                for call in plan.get("calls", []):
                    result = await session.call_tool(call["name"], call.get("arguments", {}))
                    text = "".join(c.text for c in result.content if isinstance(c, types.TextContent))
                    calls.append({"name": call["name"], "isError": bool(result.is_error), "text": text})
    print(json.dumps({"tools": tools, "calls": calls, "asked": asked}))


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
