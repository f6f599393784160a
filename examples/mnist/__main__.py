"""``python -m examples.mnist ...`` from the repository root: the same as ``python examples/mnist/main.py ...``."""

import os
import runpy

runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "main.py"), run_name="__main__")
