"""`python -m pakar <command>`: the `pakar` command without its console script, e.g. under a launcher
that takes a module: `torchrun --nproc_per_node=8 -m pakar finetune ...`."""

import sys

from pakar.cli import main

sys.exit(main())
