"""`python -m deepfleet` = the `deepfleet` command."""

from deepfleet.cli import main

if __name__ == "__main__":
    main()
