import sys

from pbp_hpc.results import main

sys.exit(main())
