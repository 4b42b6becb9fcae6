"""`python -m gateway.cli`: the `tierguard` command."""

import sys

from gateway.cli.main import main

sys.exit(main())
