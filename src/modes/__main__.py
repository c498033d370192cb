import sys

from modes.cli.main import main

sys.exit(main())
