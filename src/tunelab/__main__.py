"""`python -m tunelab ...` (and `torchrun -m tunelab ...`, `accelerate launch -m tunelab ...`): the CLI."""
from .cli import main
from .train.distributed import exit_process

exit_process(main())
