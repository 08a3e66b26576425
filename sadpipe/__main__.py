"""`python -m sadpipe ...` (and `torchrun ... -m sadpipe ...`) runs the CLI."""

from .cli import main

main()
