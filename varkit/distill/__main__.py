"""``python -m varkit.distill data …`` (what torchrun launches for ``varkit distill data --nproc N``)."""
from .cli_commands import main_module

raise SystemExit(main_module())
