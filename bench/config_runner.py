"""`python -m bench.config_runner performance_config.yaml [flags]`: the benchmark a YAML file describes."""

import sys

from bench.serving.config_runner import main, run_config  # noqa: F401 - run_config for job workers

if __name__ == "__main__":
    sys.exit(main())
