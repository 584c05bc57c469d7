"""Write the demo dataset (dates in words -> ISO 8601) as train.jsonl and eval.jsonl.

    python data_prep/make_demo_data.py --out data/demo
    python data_prep/make_demo_data.py --pairs --out data/demo_pairs    # preference pairs for DPO
"""

import argparse
from pathlib import Path

from llmft.dataset.demo import write_demo_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder")
    parser.add_argument("--train-rows", type=int, default=320)
    parser.add_argument("--eval-rows", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", action="store_true", help="preference pairs: the right date chosen, a "
                                                             "plausible wrong one rejected")
    args = parser.parse_args()
    paths = write_demo_data(args.out, args.train_rows, args.eval_rows, args.seed, args.pairs)
    print(f"wrote {args.train_rows} rows to {paths['train']} and {args.eval_rows} rows to {paths['eval']}")


if __name__ == "__main__":
    main()
