"""Shipped recipes: this directory is installed as the package ``infinitrain.recipes``."""
