"""Build a dataset from a YAML file of sources (with mix weights), cleaning settings and an output folder.

    python data_prep/build.py data_prep/builds/shared_mix.yaml

The same as `llmft data build FILE.yaml`; rerunning it rebuilds the same dataset (seeded).
"""

import sys

from llmft.cli import main

if __name__ == "__main__":
    main(["data", "build", *sys.argv[1:]])
