"""Convert data files or Hub datasets into one chat dataset (validate, normalise, dedupe, decontaminate, split).

    python data_prep/convert.py ../shared/data/alpaca_cleaned_1000.json --out data/alpaca --test-fraction 0.05
    python data_prep/convert.py ../shared/data/gsm8k/train.jsonl --format columns \\
        --prompt-field question --completion-field answer --out data/gsm8k

The same as `llmft data convert ...`; `--help` lists every flag.
"""

import sys

from llmft.cli import main

if __name__ == "__main__":
    main(["data", "convert", *sys.argv[1:]])
