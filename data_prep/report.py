"""Pre-flight report of a dataset with the tokenizer, template and max_length a recipe will train with.

    python data_prep/report.py data/mix/train --recipe recipes/smollm2-135m-instruct/lora/demo.yaml

The same as `llmft data report ...`.
"""

import sys

from llmft.cli import main

if __name__ == "__main__":
    main(["data", "report", *sys.argv[1:]])
