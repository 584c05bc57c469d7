"""Self-chat generation speed: dialogues/s and generated tokens/s, batched vs one dialogue at a time.

    python benchmarks/selfchat_throughput.py [--seeds 16] [--batch-sizes 1 8 16 32] [--max-new-tokens 64]

Runs `llmft.synth.selfchat.generate` (roleplay mode, one round: the assistant answers each seed question) on the
embedded SmolLM2-135M-Instruct with the local backend, once per batch size, on the same seeds from
data_prep/seeds/questions.txt. Greedy decoding so every batch size does the same work; the table shows the
ratio to batch size 1.
"""

import argparse
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch

    from llmft.synth.backends import LocalBackend, Sampling
    from llmft.config import ModelConfig, PeftSettings
    from llmft.model import load_model, load_tokenizer, weights_dtype
    from llmft.synth.selfchat import SelfChatConfig, generate, read_seeds

    seeds = read_seeds(str(REPO / "data_prep" / "seeds" / "questions.txt"), None, None, args.seeds)
    cfg = ModelConfig()
    model, tokenizer = load_model(cfg, PeftSettings(method="full")), load_tokenizer(cfg)
    rows = []
    for batch in args.batch_sizes:
        backend = LocalBackend(model, tokenizer, batch_size=batch)
        chat = SelfChatConfig(mode="roleplay", turns_max=1, batch_size=batch,
                              sampling=Sampling(max_new_tokens=args.max_new_tokens, temperature=0.0))
        with tempfile.TemporaryDirectory() as tmp:
            stats = generate(seeds, backend, chat, Path(tmp))
        rows.append((batch, stats))
    base = rows[0][1]["dialogues_per_s"]
    print(f"\nSmolLM2-135M-Instruct, {weights_dtype(cfg, PeftSettings(method='full'))}, {torch.get_num_threads()} "
          f"threads, {len(seeds)} seeds, up to {args.max_new_tokens} new tokens, greedy")
    print("| batch | seconds | dialogues/s | generated tokens/s | vs batch 1 |\n|---|---|---|---|---|")
    for batch, s in rows:
        print(f"| {batch} | {s['seconds']} | {s['dialogues_per_s']:.3f} | {s['generated_tokens'] / s['seconds']:.1f} "
              f"| {s['dialogues_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
