"""The seed's entry point: `python chat_interactive.py` chats with the newest checkpoints/model_epoch*.pt."""

import sys

from pakar.cli import main

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))
