"""asyncio drivers that run sans-IO protocol cores over real transports."""

from trustmesh.io.pipe import MemoryTransport, memory_pipe
from trustmesh.io.stream import StreamDriver, StreamServer, open_stream, serve_stream

__all__ = [
    "MemoryTransport",
    "StreamDriver",
    "StreamServer",
    "memory_pipe",
    "open_stream",
    "serve_stream",
]
