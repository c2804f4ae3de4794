"""``python -m sslab.lab``: run the notebooks (``make lab``)."""
import sys

from .notebooks import main

sys.exit(main())
