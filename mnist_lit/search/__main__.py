"""python -m mnist_lit.search ...: see mnist_lit/search/command.py."""

import sys

from mnist_lit.search.command import main

sys.exit(main())
