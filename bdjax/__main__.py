import sys

from bdjax.cli import main

sys.exit(main())
