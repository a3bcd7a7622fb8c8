"""`python -m frugalseg.cli ...` is the `frugalseg` command."""

from frugalseg.cli import main

main()
