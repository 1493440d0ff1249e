"""The nn-core version (one place: the package, exports and the benchmark read it)."""

__version__ = "0.1.0"
