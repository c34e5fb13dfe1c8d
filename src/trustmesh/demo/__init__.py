"""``trustmesh demo``: a self-checking mesh on loopback (and ``--tour``: the foundation)."""

from trustmesh.demo.mesh import run_mesh_demo
from trustmesh.demo.run import run_tour
from trustmesh.demo.steps import Step

__all__ = ["Step", "run_mesh_demo", "run_tour"]
