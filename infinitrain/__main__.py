"""`python -m infinitrain`: the `infinitrain` command with the interpreter it is run by (SLURM
jobs run this way, so they use the environment that submitted them)."""

from .cli import app

app(prog_name="infinitrain")
