"""The picklable messages between the control plane and its nodes.

Everything a node returns is a plain frozen dataclass, so a node can run in this
process (EmbeddedNode) or behind a Ray actor handle without a change to the
controller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Where a checkpoint came from when an instance started. The node store's "store"
# tier (a source copy on this node's disk) counts as "disk".
LoadTier = Literal["dram", "disk", "registry"]
TIERS: tuple[LoadTier, ...] = ("dram", "disk", "registry")
InstanceState = Literal["loading", "ready", "draining", "dead"]
LIVE_STATES: tuple[InstanceState, ...] = ("loading", "ready", "draining")


@dataclass(frozen=True)
class InstanceInfo:
    """One started instance: where its weights came from and how long it took (s)."""

    instance_id: str
    deployment: str
    model: str
    node: str
    tier: LoadTier
    nbytes: int
    load_s: float  # acquiring the weights (I/O from `tier`, verification)
    startup_s: float  # load_s plus building the model, KV cache and engine
    max_model_len: int
    # Serving while its weights still arrive from disk: load_s and startup_s are the
    # times to serving, and NodeRuntime.instance_loaded gives the final ones.
    loading: bool = False


@dataclass(frozen=True)
class NodeStatus:
    """A node's capacity and what it holds. `dram` maps checkpoint -> bytes in DRAM."""

    node_id: str
    slots: int
    free_slots: int
    dram: dict[str, int] = field(default_factory=dict)
    disk: tuple[str, ...] = ()
    instances: tuple[str, ...] = ()  # ids of the instances running or loading there


@dataclass(frozen=True)
class BandwidthProbe:
    """Bytes per second a node measured for each tier it could probe."""

    node_id: str
    bytes_per_s: dict[str, float]
