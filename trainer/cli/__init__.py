"""The one ``binaryduo`` command: ``main.py`` builds the parser and runs the core commands
(validate, train, demo, report, analyze decoupling); one module per command group registers the
rest (``data``, ``compare``, ``slurm``, ``tracking``, ``analysis``). ``errors.py`` is the only thing
they share. Runnable as ``python -m binaryduo.trainer.cli`` (``__main__.py``)."""
