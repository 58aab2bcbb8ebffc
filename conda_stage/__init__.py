"""conda-stage: run Conda environments from node-local disk."""

__version__ = "0.1.0"
