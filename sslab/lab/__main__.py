"""``python -m sslab.lab``: run the notebooks (``make lab``)."""
import sys

from .notebooks import main

if __name__ == "__main__":
    sys.exit(main())
