"""Entry point for ``python packages/llava/train.py`` and ``deepspeed packages/llava/train.py``.

See :mod:`mmr_llava.train` for the options.
"""

import sys

from mmr_llava.train import main

if __name__ == "__main__":
    sys.exit(main())
