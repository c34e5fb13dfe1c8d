"""HTTP APIs (aiohttp) over trustmesh TLS: the mesh CA's enrollment, rotation and
revocation API, and later the mesh node's."""
