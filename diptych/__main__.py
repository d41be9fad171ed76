import sys

from diptych.cli import main

sys.exit(main())
