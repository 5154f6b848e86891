"""infinitrain: train long-context Infini-Transformers end to end."""

__version__ = "0.1.0"
