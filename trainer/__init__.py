"""binaryduo.trainer: from a recipe to trained stages, checkpoints and an MLflow record.

One sub-package per concern; imports point down this list, never up:

- ``cli``       the one ``binaryduo`` command: parses, validates, calls one function per command
- ``run``       the stage runner (``runner.py``, read it top to bottom), transitions such as
                decouple, the epoch loop, the DeepSpeed engine, data feed, checkpoints
- ``analysis``  gradient mismatch (CDG), model cost and decoupling reports
- ``recipe``    the recipe schema (pydantic), YAML loading with line numbers and ``--set``, checks
- ``runtime``   process group, global-batch BatchNorm, preemption, fault-injection hooks
- ``tracking``  MLflow tracker and its journal, provenance, training curves, ``compare``

The trainer may use ``binaryduo.models``, ``binaryduo.data`` and ``binaryduo.slurm``; none of them
imports the trainer.
"""
