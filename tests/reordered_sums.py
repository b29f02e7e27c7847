"""A pakar command (`train`, `finetune`) whose micro-batches hold their rows in reverse order: the
float32 noise reference of tests/test_distributed.py.

Every row (sequence) is computed as in the plain command and every optimizer step sees the same rows;
only the order of the sums over the rows' tokens changes (the loss, the weight gradients that matmuls
accumulate over tokens, the MoE dispatch that sorts tokens by expert, the balancing statistics).
Mathematically it is the same training, so its distance from the plain run is pure reduction-order
rounding, carried through the training dynamics on this very CPU, BLAS and thread count: the yardstick
for the sharded runs, which sum the same terms in yet another order.

    python tests/reordered_sums.py train ARGS...     (the arguments of `pakar train`)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pakar import chat_data, train  # noqa: E402
from pakar.cli import main  # noqa: E402


def flip_rows(cls) -> None:
    """cls.get(epoch, index) -> (x, y) returns its rows in reverse order."""
    get = cls.get

    def flipped(self, epoch: int, index: int):
        x, y = get(self, epoch, index)
        return x.flip(0), y.flip(0)

    cls.get = flipped


if __name__ == "__main__":
    flip_rows(train.TokenStreamData)  # pretraining
    flip_rows(chat_data.ChatData)  # chat fine-tuning
    sys.exit(main(sys.argv[1:]))
