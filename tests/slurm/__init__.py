"""Helpers for tests that need a real (single-node, throw-away) Slurm cluster."""

from .cluster import SlurmCluster, slurm_cluster

__all__ = ["SlurmCluster", "slurm_cluster"]
