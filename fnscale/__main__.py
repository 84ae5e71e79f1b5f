"""Entry point for `python -m fnscale`, `accelerate launch -m fnscale` and `accelerate launch fnscale`.

When this folder is run as a script (`accelerate launch fnscale train` from the repo root), Python puts
the package folder itself on sys.path, so its modules would shadow real packages; drop it first.
"""
import os
import sys

if not __package__:
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from fnscale.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
