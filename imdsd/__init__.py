"""imdsd: a node-level daemon that caches Azure IMDS, reports changes and runs hooks."""

__version__ = "0.1.0"
