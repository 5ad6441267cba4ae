"""ember sim: a discrete-event simulator of the serverless cluster in virtual time, over the
real control plane (docs/cluster.md)."""
