"""python -m amnets corpus|train|eval|demo: see amnets.cli."""

import sys

from .cli import main

sys.exit(main())
