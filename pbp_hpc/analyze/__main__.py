import sys

from pbp_hpc.analyze import main

sys.exit(main())
