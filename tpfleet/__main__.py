import sys

from tpfleet.cli import main

sys.exit(main())
