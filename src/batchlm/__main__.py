"""`python -m batchlm ...`: the `batchlm` command."""

from batchlm.cli import main

raise SystemExit(main())
