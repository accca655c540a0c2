"""Answer an image+text prompt with an Int4 checkpoint; prints memory used and tokens/s.

    python scripts/int4_generate.py --model INT4_PATH --image a.png --prompt "..." [generate.py options]

Same as ``python scripts/generate.py --int4 ...`` (one implementation: this forwards to it).
"""

from __future__ import annotations

import os
import runpy
import sys

if __name__ == "__main__":
    sys.argv.insert(1, "--int4")
    generate = os.path.join(os.path.dirname(os.path.abspath(__file__)), "generate.py")
    # errors, usage and --help under this script's name and with its own description
    runpy.run_path(generate, run_name="generate")["cli"](__doc__)
