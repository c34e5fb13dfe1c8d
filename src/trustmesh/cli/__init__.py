"""The trustmesh command line."""
