"""The ceiling: an aiohttp handler that only parses the JSON body and answers 200."""

from __future__ import annotations

import json
import sys

from aiohttp import web


async def hook(request: web.Request) -> web.Response:
    json.loads(await request.read())
    return web.json_response({"accepted": 1, "duplicates": 0})


app = web.Application()
app.router.add_post("/hooks/{source}", hook)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
