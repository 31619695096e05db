"""`python -m minibt.cli`: the `minibt` command."""

from minibt.cli import main

main()
