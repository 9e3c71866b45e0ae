"""Child process of tests/test_atomic_saves.py: save a LoRA file and a training state over and over until killed.

Uses the writers the trainer uses (`safe_io.atomic_save_safetensors`, which `LoRANetwork.save_weights` calls, and
`train_state.save_state`) on a small stand-in network, so that the process starts fast (no diffusers import).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
torch.set_num_threads(1)

from library.safe_io import atomic_save_safetensors, remove_stale_temp_files  # noqa: E402
from library.train_state import save_state  # noqa: E402

out = sys.argv[1]
net = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(16)])  # ~4 MB per save
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
remove_stale_temp_files(out)  # what the trainer does at start
print("ready", flush=True)
i = 0
while True:
    i += 1
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(float(i))
    atomic_save_safetensors({k: v.clone() for k, v in net.state_dict().items()}, os.path.join(out, "lora.safetensors"),
                            {"ss_steps": str(i)}, overwrite=True)
    save_state(os.path.join(out, "lora-state"), network=net, optimizer=opt, lr_scheduler=sched, step=i, epoch=1,
               batches_done=i, seed=0, overwrite=True)
