import sys

from lsgd_ray.cli import main

sys.exit(main())
