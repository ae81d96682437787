"""`python -m dalikd` (and `torchrun ... -m dalikd`) runs the command line."""

from dalikd.cli.main import main

if __name__ == "__main__":  # not when a worker process imports this module again (forkserver)
    main()
