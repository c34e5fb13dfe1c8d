"""The API's default request rate per client; the limiter itself is
:class:`trustmesh.ratelimit.RateLimiter` (the I/O layer's admission uses it too)."""

from trustmesh.ratelimit import MAX_CLIENTS, RateLimiter

DEFAULT_RATE = 5.0  # requests per second per client, on average
DEFAULT_BURST = 20

__all__ = ["DEFAULT_BURST", "DEFAULT_RATE", "MAX_CLIENTS", "RateLimiter"]
