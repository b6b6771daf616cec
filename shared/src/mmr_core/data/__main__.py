"""``python -m mmr_core.data``: write WebDataset shards from a manifest (see :mod:`mmr_core.data.cli`)."""

import sys

from mmr_core.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
