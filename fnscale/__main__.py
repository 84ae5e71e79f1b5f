"""Entry point for `python -m fnscale`, `accelerate launch -m fnscale` and `accelerate launch fnscale`.

Run as a script (`accelerate launch fnscale train` from the repo root), Python puts the package folder
itself on sys.path, so its modules would shadow real packages. Run as `-m` from the repo root, the root
is on sys.path and its `kernels/` folder (installed as fnscale.kernels) would shadow Hugging Face's
`kernels` package, which transformers and bitsandbytes probe for. Drop both entries: the installed
package is found without them.
"""

import os
import sys

_pkg = os.path.dirname(os.path.abspath(__file__))
_root = os.path.dirname(_pkg)
_shadowing = {_pkg} | ({_root} if os.path.isdir(os.path.join(_root, "kernels")) else set())
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) not in _shadowing]

from fnscale.cli.app import main  # noqa: E402

if __name__ == "__main__":
    main()
