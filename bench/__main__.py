"""`python -m bench`: the serving benchmark (the same as `mxext bench`)."""

import sys

from bench.serving.cli import main

if __name__ == "__main__":
    sys.exit(main())
