import sys

from dln_ens.cli import main

sys.exit(main())
