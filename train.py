"""The seed's entry point, unchanged for the user: `python train.py --epochs 5 --batch 2 --config default --seq-len 256`."""

import sys

try:
    from pakar.cli import main
except ImportError as e:  # a folder named "pakar" (e.g. this repository's clone) seen from its parent
    sys.exit(f"error: cannot import pakar.cli ({e}): a folder named 'pakar' without __init__.py, such as "
             f"this repository cloned as 'pakar', hides the package. Change into the repository folder "
             f"(the one with pyproject.toml) and run the command there.")

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
