"""HttpSource.read_range hands over the body as sent (raw, no re-chunking), and
decodes it only when a server encoded it although asked for identity."""

from __future__ import annotations

import gzip

import httpx
import pytest

from ember.store.http_source import HttpSource

pytestmark = pytest.mark.timeout(30)
DATA = bytes(range(256)) * 4096  # 1 MiB


def _source(encoding: str | None) -> tuple[HttpSource, list[str]]:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("accept-encoding", ""))
        first, last = (int(x) for x in request.headers["range"].removeprefix("bytes=").split("-"))
        body = DATA[first : last + 1]
        headers = {"content-range": f"bytes {first}-{last}/{len(DATA)}"}
        if encoding is not None:
            headers["content-encoding"] = encoding
            body = gzip.compress(body) if encoding == "gzip" else body
        # A stream, as a network answer is (content= would hand over a body read already).
        return httpx.Response(206, headers=headers, stream=httpx.ByteStream(body))

    client = httpx.Client(transport=httpx.MockTransport(handler), headers={"Accept-Encoding": "identity"})
    return HttpSource(client, "http://registry/ckpt"), asked


@pytest.mark.parametrize("encoding", [None, "identity", "gzip"])
def test_a_range_arrives_byte_exact_whatever_the_encoding(encoding: str | None) -> None:
    source, asked = _source(encoding)
    got = b"".join(source.read_range("part-00000.bin", 4096, 100_000, len(DATA)))
    assert got == DATA[4096 : 4096 + 100_000]
    assert asked == ["identity"]
