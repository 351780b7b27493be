import sys

from ._export import main

sys.exit(main())
