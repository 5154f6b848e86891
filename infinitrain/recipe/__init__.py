"""Recipes: typed, validated YAML descriptions of training runs (``recipes/*.yaml``)."""

from .loading import dump_recipe, load_recipe, parse_recipe, shipped_recipes
from .schema import (
    CheckpointSection,
    DataSection,
    DeepSpeedSection,
    LoggingSection,
    ModelSection,
    OptimSection,
    Recipe,
    TrainSection,
    ValidationSection,
)
from .typed import RecipeError

__all__ = [
    "CheckpointSection",
    "DataSection",
    "DeepSpeedSection",
    "LoggingSection",
    "ModelSection",
    "OptimSection",
    "Recipe",
    "RecipeError",
    "TrainSection",
    "ValidationSection",
    "dump_recipe",
    "load_recipe",
    "parse_recipe",
    "shipped_recipes",
]
