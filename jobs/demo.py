"""`make demo`: the whole platform on this machine (see drivedit/demo.py)."""
import sys

from drivedit.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
