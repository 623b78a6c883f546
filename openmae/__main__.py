import sys

from openmae.cli import main

sys.exit(main())
