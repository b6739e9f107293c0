"""Open a page in headless Chromium, networking off, and inspect it over the DevTools protocol.

The websocket client is aiohttp's, already installed as a dependency of ``ray[default]``.
Networking is off: every request goes to a proxy at the discard port, loopback included, and the
test also fails on any request for something that is not a ``file:`` or ``data:`` URL.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

LOCAL_SCHEMES = ("file:", "data:", "about:")
TIMEOUT = 60.0


def chromium_binary() -> str | None:
    """Debian's ``chromium`` (installed by ``.ci/chromium``), if it is on PATH."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageCheck:
    """What a page did while loading, the value of a script evaluated on it, and a screenshot."""

    problems: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    value: Any = None
    screenshot: bytes = b""


def inspect_page(url: str, script: str, profile: Path) -> PageCheck:
    """Load ``url``, evaluate ``script`` (an expression; its value is returned), take a screenshot."""
    return asyncio.run(asyncio.wait_for(_inspect(url, script, profile), TIMEOUT))


async def _inspect(url: str, script: str, profile: Path) -> PageCheck:
    arguments = [
        chromium_binary() or "chromium",
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>",
        "--window-size=1280,1600",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    process = await asyncio.create_subprocess_exec(*arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = await _devtools_port(profile)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page = next(target for target in targets if target["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as socket:
                return await _DevTools(socket).check(url, script)
    finally:
        process.kill()
        await process.wait()


async def _devtools_port(profile: Path) -> int:
    """Chromium writes the port it chose into ``DevToolsActivePort`` in its profile."""
    marker = profile / "DevToolsActivePort"
    while True:
        if marker.exists() and marker.read_text().strip():
            return int(marker.read_text().split()[0])
        await asyncio.sleep(0.05)


class _DevTools:
    """Commands with ids over one page's websocket; events recorded as they arrive."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket = socket
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.loaded = asyncio.Event()
        self.result = PageCheck()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.socket.send_json({"id": self.next_id, "method": method, "params": params})
        return await future

    async def check(self, url: str, script: str) -> PageCheck:
        listener = asyncio.create_task(self._listen())
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                await self.call(f"{domain}.enable")
            self.loaded.clear()
            await self.call("Page.navigate", url=url)
            await self.loaded.wait()
            evaluated = await self.call("Runtime.evaluate", expression=script, returnByValue=True, awaitPromise=True)
            if "exceptionDetails" in evaluated:
                raise AssertionError(f"check script failed: {evaluated['exceptionDetails']}")
            self.result.value = evaluated["result"].get("value")
            shot = await self.call("Page.captureScreenshot", format="png")
            self.result.screenshot = base64.b64decode(shot["data"])
            return self.result
        finally:
            listener.cancel()

    async def _listen(self) -> None:
        async for message in self.socket:
            data = json.loads(message.data)
            if "id" in data:
                future = self.pending.pop(data["id"])
                if "error" in data:
                    future.set_exception(RuntimeError(f"DevTools error: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
            else:
                self._event(data["method"], data.get("params", {}))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired":
            self.loaded.set()
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.result.problems.append(f"console.{params['type']}: {params.get('args')}")
        elif method == "Runtime.exceptionThrown":
            self.result.problems.append(f"exception: {params.get('exceptionDetails')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            self.result.problems.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        elif method == "Network.requestWillBeSent":
            request_url = params.get("request", {}).get("url", "")
            if not request_url.startswith(LOCAL_SCHEMES):
                self.result.requests.append(request_url)
