"""``trustmesh sim``: a deterministic discrete-event simulation of the mesh that runs the
real cores (docs/sim.md)."""

from trustmesh.sim.config import SimConfig, parse_range
from trustmesh.sim.world import SimResult, Simulation, simulate

__all__ = ["SimConfig", "SimResult", "Simulation", "parse_range", "simulate"]
