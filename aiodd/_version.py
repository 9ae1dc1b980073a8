"""The version, on its own so that a module may name it without importing the package
face (the formats are sans-IO and import nothing of the host: docs/architecture.md,
"The formats")."""

__version__ = "0.1.0"
