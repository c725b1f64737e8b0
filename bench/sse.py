"""Reading an SSE response in the benchmark clients (the test suite has its own strict parser), and
the percentile the reports use."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx


async def aiter_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event name, parsed `data`) for each event of a streaming response, as it arrives; `:` comments
    (pings) are skipped. Expects the server's one layout: `id:`, `event:`, one `data:` line."""
    buffer = b""
    async for chunk in response.aiter_raw():
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            if block.startswith(b":"):
                continue
            lines = block.decode().split("\n")
            yield lines[1][len("event: ") :], json.loads(lines[2][len("data: ") :])


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation (numpy's default); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
