"""gptx reproduces nanoGPT's own log of its CPU Shakespeare recipe, number for number.

nanoGPT (karpathy/nanoGPT, train.py with config/train_shakespeare_char.py and the README's CPU
flags: block 64, batch 12, 4 layers, 4 heads, 128 wide, 2000 steps, dropout 0) seeds torch with
1337, builds its model, then draws every batch from torch's global generator: the first training
batch, then at every evaluation 20 training and 20 validation batches, then after each forward
the next training batch. gptx with the same seed builds the same initial weights, so feeding
its model, AdamW, schedule and training step that same stream must give nanoGPT's numbers.

EXPECTED is what nanoGPT printed on this project's CPU (2 threads, torch 2.13):
``python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``. The suite checks the first two
evaluations (250 steps); ``GPTX_PARITY_STEPS=2000`` checks all nine, ending at nanoGPT's 1.8857.

A gptx run draws its batches from its own generators instead (training and evaluation apart, so
a resumed run continues the same stream), so its numbers for a seed are another sample of the
same distribution, not these.
"""
import os

import numpy as np
import pytest
import torch
from helpers import REPO

from gptx import distributed
from gptx.config import load_experiment
from gptx.model import GPT
from gptx.plugins.tokenizers import CharTokenizer
from gptx.training.step import BatchSplit, build_optimizer, build_schedule, set_lr, TrainStep

# step: (train loss, val loss), as nanoGPT logged them
EXPECTED = {
    0: (4.1676, 4.1649), 250: (2.4293, 2.4447), 500: (2.2732, 2.3141), 750: (2.1338, 2.1905),
    1000: (1.9714, 2.0528), 1250: (1.8756, 2.0089), 1500: (1.8557, 1.9225), 1750: (1.7790, 1.8921),
    2000: (1.7648, 1.8857),
}


def test_gptx_fed_nanogpts_batches_reproduces_its_log():
    steps = int(os.environ.get("GPTX_PARITY_STEPS", "250"))
    cfg = load_experiment(REPO / "experiments" / "shakespeare_char.toml")
    tc = cfg.training
    tokenizer = CharTokenizer(None)
    dataset = cfg.data.cls(cfg.data.options, base_dir=cfg.base_dir, tokenizer=tokenizer,
                           block_size=cfg.model.block_size, seed=tc.seed)
    dataset.prepare()
    data = dataset  # its train and val token arrays: nanoGPT samples its windows from them itself
    cfg.model.vocab_size = tokenizer.vocab_size
    n = len(data.train) + len(data.val)
    assert (tokenizer.vocab_size, len(data.train), len(data.val)) == (65, int(n * 0.9), n - int(n * 0.9))

    torch.manual_seed(tc.seed)
    model = GPT(cfg.model)
    device = torch.device("cpu")
    dist = distributed.setup(device, "ddp")
    optimizer, schedule = build_optimizer(cfg, model, device), build_schedule(cfg)
    train_step = TrainStep(model, optimizer, tc, dist, device, BatchSplit.plan(tc))
    T, B = cfg.model.block_size, tc.batch_size

    def nanogpt_batch(split):  # [B, T] inputs and targets, from the global generator
        tokens = data.train if split == "train" else data.val
        starts = torch.randint(len(tokens) - T, (B,)).numpy()
        rows = torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(T + 1)], dtype=np.int64))
        return rows[:, :-1], rows[:, 1:]

    def ce(x, y):  # x, y [B, T] -> the mean cross-entropy
        return model(x, targets=y).ce

    def estimate():  # nanoGPT's estimate_loss: the mean of 20 fresh batches per split
        model.eval()
        with torch.no_grad():
            out = tuple(float(torch.stack([ce(*nanogpt_batch(s)) for _ in range(tc.eval_steps)]).mean())
                        for s in ("train", "val"))
        model.train()
        return out

    seen = {}
    x, y = nanogpt_batch("train")
    for it in range(steps + 1):
        if it % tc.eval_interval == 0:
            seen[it] = estimate()
        if it == steps:
            break
        batch, (x, y) = (x, y), nanogpt_batch("train")
        set_lr(optimizer, schedule.factor(it))
        train_step(*batch)
    expected = {it: EXPECTED[it] for it in seen}
    assert len(expected) >= 2
    assert seen == {it: pytest.approx(v, abs=6e-4) for it, v in expected.items()}, (seen, expected)
