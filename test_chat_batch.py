"""The seed's entry point: `python test_chat_batch.py` answers a built-in set of Indonesian prompts and writes a report."""

import sys

from pakar.cli import main

if __name__ == "__main__":
    sys.exit(main(["chat-batch", *sys.argv[1:]]))
