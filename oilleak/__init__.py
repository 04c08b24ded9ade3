"""oilleak: find and outline oil leaks in substation inspection images."""

__version__ = "0.1.0"
