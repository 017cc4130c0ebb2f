"""`python -m cvfast`: the command line (also what torchrun / accelerate launch run with -m cvfast)."""

from cvfast.cli import run

run()
