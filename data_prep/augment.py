"""Augment a chat dataset by paraphrasing (or back-translating) its user turns with a local model or an
OpenAI-compatible server; the answers are kept. The same as `llmft augment ...`; `--help` lists every option.

    python data_prep/augment.py data/demo/train.jsonl --out data/demo-aug/train.jsonl --mode paraphrase
    python data_prep/augment.py train.jsonl --out aug.jsonl --mode backtranslate --pivot German \\
        --base-url http://localhost:8000/v1 --api-model Qwen/Qwen2.5-7B-Instruct   # key from $OPENAI_API_KEY
"""

import sys

from llmft.cli import main

if __name__ == "__main__":
    main(["augment", *sys.argv[1:]])
