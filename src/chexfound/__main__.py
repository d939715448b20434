import sys

from chexfound.cli.main import main

sys.exit(main())
