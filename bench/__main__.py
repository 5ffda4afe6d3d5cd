"""`python -m bench ...`: see bench/cli.py and bench/README.md."""

from .cli import main

if __name__ == "__main__":
    main()
