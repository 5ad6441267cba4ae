"""The serverless control plane (ServerlessLLM): deployments in `state`, nodes behind
`runtime.NodeRuntime` (`node.EmbeddedNode` in this process), `estimator`,
`placement`, `autoscaler`, `router`, and the `controller` that the server serves."""
