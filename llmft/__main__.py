"""`python -m llmft` (what `accelerate launch -m llmft` runs)."""

from llmft.cli import main

if __name__ == "__main__":
    main()
