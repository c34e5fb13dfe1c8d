"""trustmesh: zero-trust peer-to-peer security in one Python system."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trustmesh")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
