"""`python -m pytest_ckptparity A B ...`: the `ckptparity` command line."""

import sys

from pytest_ckptparity.cli import main

sys.exit(main())
