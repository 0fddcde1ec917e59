"""``python -m binaryduo.trainer.cli``: what launchers (torchrun, deepspeed --module) start."""
import sys

from binaryduo.trainer.cli.main import main

sys.exit(main())
