"""Generate multi-turn dialogues by self-chat (Baize), from seed questions, with a local model or an
OpenAI-compatible server; resumable. The same as `llmft selfchat ...`; `--help` lists every option.

    python data_prep/self_chat.py --seeds data_prep/seeds/questions.txt --out data/selfchat --limit 8
    python data_prep/self_chat.py --config data_prep/selfchat/baize.yaml
    python data_prep/self_chat.py --seeds seeds.jsonl --seed-column question --out data/sc \\
        --base-url http://localhost:8000/v1 --api-model Qwen/Qwen2.5-7B-Instruct   # key from $OPENAI_API_KEY
"""

import sys

from llmft.cli import main

if __name__ == "__main__":
    main(["selfchat", *sys.argv[1:]])
