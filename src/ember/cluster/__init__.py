"""The serverless control plane: deployments, startup-time-aware placement,
autoscaling and routing over nodes (ServerlessLLM)."""

from ember.cluster.controller import Controller, ControllerConfig
from ember.cluster.node import EmbeddedNode
from ember.cluster.state import ClusterState, Deployment

__all__ = ["ClusterState", "Controller", "ControllerConfig", "Deployment", "EmbeddedNode"]
