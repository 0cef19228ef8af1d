"""`python -m tunelab ...` (and `torchrun -m tunelab ...`, `accelerate launch -m tunelab ...`): the CLI."""
import sys

from .cli import main

sys.exit(main())
