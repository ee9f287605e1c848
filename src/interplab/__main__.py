"""`python -m interplab` (and `torchrun ... -m interplab`) runs the CLI."""

from interplab.cli import main

main()
