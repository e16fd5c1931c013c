import sys

from lpl.cli import main

if __name__ == "__main__":
    sys.argv[0] = "lpl"  # usage and tips name the command, not __main__.py
    main()
