"""Clustering: several gochan nodes on one broker, any node serving any
client (see docs/cluster.md). Off unless ``cluster: true``."""

from __future__ import annotations

from .node import ClusterNode, Record, create_store, default_node_id
from .store import ALL_NODES, ClusterStore, Entry, key_of, valid_node_id

__all__ = [
    "ALL_NODES",
    "ClusterNode",
    "ClusterStore",
    "Entry",
    "Record",
    "create_store",
    "default_node_id",
    "key_of",
    "valid_node_id",
]
