"""The seed's entry point, unchanged for the user: `python train.py --epochs 5 --batch 2 --config default --seq-len 256`."""

import sys

from pakar.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
