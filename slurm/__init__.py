"""Running binaryduo on Slurm: the sbatch template, and the code that renders, submits and
follows it.

- ``render``     the job script: ``binaryduo.sbatch`` (package data) filled in with the options
- ``submit``     the run directory's records, the ``sbatch`` call, the submit directory's index
- ``status``     a job's state from ``scontrol``/``sacct``, else from the run's ``attempts.log``
- ``progress``   a run directory's training progress and the ``binaryduo slurm status`` report
- ``run_files``  where a submitted run directory keeps its Slurm files
- ``hostlist``   Slurm host lists (the rendezvous host of a job without a launcher)

It takes plain data (paths, strings, dicts) and imports nothing of ``binaryduo.trainer``: the
``binaryduo slurm`` commands (``binaryduo.trainer.cli.slurm``) validate and resolve the recipe and
hand the resolved recipe over; the trainer may import from here (``hostlist``). See README.md.
"""
