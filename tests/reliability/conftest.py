"""The fault-injection suite (issue 5): crashes, corrupt checkpoints, dataset faults, a tracking
server that goes away, divergence, a full disk, malformed recipes and untrusted files. Each test
drives the real ``binaryduo`` command (tests/conftest.py: ``run_binaryduo``, ``tiny_recipe``) and
checks what a user would see: the exit code, the one-line message, and that nothing was lost."""
