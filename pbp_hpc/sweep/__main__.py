import sys

from pbp_hpc.sweep import main

sys.exit(main())
