"""sbatch templates for `infinitrain submit`: this directory is installed as the package
``infinitrain.slurm_templates``."""
