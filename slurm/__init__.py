"""sbatch templates and their README, installed as ``binaryduo.slurm`` so ``importlib.resources``
finds them; data only (``binaryduo.slurm.jobs`` renders and submits them)."""
