"""``python -m kdscale``: the same command as the ``kdscale`` console script (useful where the
venv's bin/ is not on PATH, e.g. inside an sbatch script that only knows the interpreter)."""
import sys

from kdscale.cli import main

sys.exit(main())
