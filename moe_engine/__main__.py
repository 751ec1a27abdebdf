"""`python -m moe_engine ...` is the `moe-engine` command (torchrun -m moe_engine serve ... launches it per rank)."""
import sys

from .cli import main

sys.exit(main())
