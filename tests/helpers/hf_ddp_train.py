"""One rank of a 2-process Hugging Face Trainer run (DDP on gloo) that saves through StoreCallback.

    RANK=r WORLD_SIZE=w LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python hf_ddp_train.py OUTPUT_DIR STORE_DIR MAX_STEPS SAVE_STEPS KEEP_LAST [preempt]

Started by tests/helpers/ranks.py (see tests/test_ddp_adapters.py). The
Trainer initialises the process group itself from that environment
(``use_cpu=True, ddp_backend="gloo"``). Every rank prints ``STEP <n>`` at the
end of each step and, when training has ended, one ``RESULT {json}`` line:
its rank, the global step it stopped at, the world size the Trainer saw, and
the steps at which ``on_save`` ran on it. ``preempt``: the callback gets
``preemption_signals=[SIGTERM]`` and each step takes at least 50 ms, so that
a SIGTERM the test sends after a ``STEP`` line lands mid-training.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ckptstore.integrations.transformers import StoreCallback
from tiny_gpt2 import dataset, tiny_model




class Report(TrainerCallback):
    """Prints each finished step; remembers the steps whose save reached the callbacks."""

    def __init__(self, slow: bool):
        self.slow = slow
        self.saves: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        if self.slow:
            time.sleep(0.05)
        print(f"STEP {state.global_step}", flush=True)

    def on_save(self, args, state, control, **kwargs):
        self.saves.append(state.global_step)


def main() -> None:
    output_dir, store_dir = sys.argv[1], sys.argv[2]
    max_steps, save_steps, keep_last = (int(a) for a in sys.argv[3:6])
    preempt = sys.argv[6:] == ["preempt"]
    args = TrainingArguments(output_dir=output_dir, use_cpu=True, ddp_backend="gloo", max_steps=max_steps,
                             save_strategy="steps", save_steps=save_steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], disable_tqdm=True, seed=7, logging_steps=1,
                             dataloader_num_workers=0)
    store = StoreCallback(store_dir, keep_last=keep_last,
                          preemption_signals=[signal.SIGTERM] if preempt else None)
    report = Report(slow=preempt)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=dataset(), callbacks=[store, report])
    trainer.train()
    rank = int(os.environ["RANK"])
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    print("RESULT " + json.dumps({"kind": "done", "rank": rank, "world_size": world,
                                  "global_step": trainer.state.global_step, "saves": report.saves}), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Not a normal interpreter shutdown: there, now and then, DDP's Reducer is freed while a
    # gloo run-loop thread frees an allgather's tensors; ~ProcessGroupGloo joins that thread
    # holding the GIL, the thread waits for the GIL, and the rank never exits (seen with gdb).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
