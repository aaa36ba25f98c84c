"""``python -m thinet_fast.cli`` is ``thinet-fast``."""
import sys

from . import main

sys.exit(main())
