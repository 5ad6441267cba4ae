"""The benchmarks' loopback registry: whole files, byte ranges, nothing outside its root."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from ember.bench.registry_server import serve_registry
from ember.store.registry import HttpRegistry
from ember.store.writer import save_tensors


@pytest.mark.timeout(60)
def test_serves_files_ranges_and_a_checkpoint_fetch(tmp_path: Path) -> None:
    import torch

    root = tmp_path / "registry"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "f.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "secret").write_text("no")
    save_tensors({"w": torch.arange(1000, dtype=torch.float32)}, root / "ck")
    with serve_registry(root) as url, httpx.Client() as client:
        assert client.get(f"{url}/dir/f.bin").content == bytes(range(256)) * 4
        part = client.get(f"{url}/dir/f.bin", headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == bytes(range(10, 20))
        assert part.headers["content-range"] == "bytes 10-19/1024"
        assert client.head(f"{url}/dir/f.bin").headers["content-length"] == "1024"
        assert client.get(f"{url}/missing").status_code == 404
        assert client.get(f"{url}/../secret").status_code == 404
        with HttpRegistry(url) as registry:
            registry.fetch("ck", tmp_path / "copy")
    from ember.store.loader import load_tensors

    assert torch.equal(load_tensors(tmp_path / "copy")["w"], torch.arange(1000, dtype=torch.float32))
