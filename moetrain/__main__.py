"""`python -m moetrain`: the moetrain command line (moetrain.cli)."""

from moetrain.cli import main

if __name__ == "__main__":
    main()
