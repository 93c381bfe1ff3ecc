import sys

from pbp_hpc.bench import main

sys.exit(main())
