import sys

from dualenc.cli import main

sys.exit(main())
