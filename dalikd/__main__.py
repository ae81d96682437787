"""`python -m dalikd` (and `torchrun ... -m dalikd`) runs the command line."""

from dalikd.cli.main import main

main()
