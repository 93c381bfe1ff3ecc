import sys

from pbp_hpc.elastic import main

sys.exit(main())
