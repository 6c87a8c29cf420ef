import os
import sys

# Make `distributed_helper` and the repository root importable from every test (and from the
# processes it spawns, which inherit sys.path).
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)
