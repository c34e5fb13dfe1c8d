"""``trustmesh demo``: a guided, self-checking tour of what trustmesh does."""

from trustmesh.demo.run import Step, run_demo

__all__ = ["Step", "run_demo"]
