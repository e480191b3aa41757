import sys

from keepbest.cli import main

sys.exit(main())
