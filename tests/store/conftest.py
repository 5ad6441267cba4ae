"""Fixtures for the tier tests: small checkpoints, and nginx serving a registry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ember.store import save_tensors
from tests.store.nginx_server import NginxServer

MIB = 1 << 20


def write_checkpoint(
    path: Path, *, mib: int = 1, seed: int = 0, partition_mib: int = 1024
) -> dict[str, torch.Tensor]:
    """Save a checkpoint of about `mib` MiB (one big tensor plus tied small ones and a
    config file) at `path`; returns its tensors."""
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(64, 32, generator=gen)
    tensors = {
        "big": torch.randn(mib * MIB // 4, generator=gen),
        "second": torch.randn(3 * MIB // 4, generator=gen),
        "embed": emb,
        "lm_head": emb,
    }
    save_tensors(
        tensors,
        path,
        files={"model/config.json": f'{{"seed": {seed}}}'.encode()},
        partition_size=partition_mib * MIB,
    )
    return tensors


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    """One nginx per test module, serving an initially empty directory (server.root)."""
    root = tmp_path_factory.mktemp("nginx-root")
    root.chmod(0o755)
    with NginxServer(root, tmp_path_factory.mktemp("nginx-run")) as server:
        yield server
