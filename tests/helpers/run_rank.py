"""One process of a multi-process training run (tests/test_multiprocess.py), started by `accelerate launch`.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/helpers/run_rank.py \
        --rank_out DIR <train_apt_lora.py arguments>

Parses the trainer's arguments as `train_apt_lora.py` does (`setup_parser()` + `parse_args_with_config`), runs
`train_apt_lora.train(args)`, and saves this rank's LoRA `network.state_dict()` to `DIR/rank{RANK}.safetensors`, and
the state dict right after `create_network` (before any step) to `DIR/rank{RANK}_init.safetensors`, and the
`image_keys` of every batch this rank trained on to `DIR/rank{RANK}_keys.json`, a fingerprint of the torch RNG state
before each of its micro-batches to `DIR/rank{RANK}_rng.json`; with APT, the indicator state to
`DIR/rank{RANK}_apt.safetensors`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def _save(state_dict, path):
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, path)


def main(argv=None) -> int:
    import train_apt_lora
    from library.train_args import setup_parser
    from library.config_file import parse_args_with_config
    from networks import lora as lora_lib

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--rank_out", required=True, help="folder for rank{RANK}.safetensors")
    ours, rest = pre.parse_known_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(ours.rank_out, exist_ok=True)

    create_network = lora_lib.create_network

    def create_and_snapshot(model, args, module_dims=None):  # the weights every rank starts from
        network = create_network(model, args, module_dims)
        _save(network.state_dict(), os.path.join(ours.rank_out, f"rank{rank}_init.safetensors"))
        return network

    lora_lib.create_network = create_and_snapshot

    seen, apt_holder, draws = [], [], []
    training_step = train_apt_lora.training_step

    fail_rank = os.environ.get("APT_TEST_FAIL_RANK")
    nan_rank = os.environ.get("APT_TEST_NAN_RANK")
    signal_rank = os.environ.get("APT_TEST_SIGNAL_RANK")

    def record_and_step(args, ctx, batch):  # which images this rank's micro-batches held (and its APT state)
        seen.append(list(batch["image_keys"]))
        draws.append(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16])
        if fail_rank is not None and int(fail_rank) == rank and len(seen) == 2:  # tests: a rank that crashes
            raise RuntimeError(f"injected failure on rank {rank}")
        if signal_rank is not None and int(signal_rank) == rank and len(seen) == 2:  # tests: Ctrl-C on one rank
            os.kill(os.getpid(), signal.SIGINT)
        if ctx.apt is not None and not apt_holder:
            apt_holder.append(ctx.apt)
        loss, logs = training_step(args, ctx, batch)
        if nan_rank is not None and int(nan_rank) == rank and len(seen) == 2:  # tests: a NaN loss on one rank only
            loss = loss * float("nan")
        return loss, logs

    train_apt_lora.training_step = record_and_step
    if os.environ.get("APT_TEST_NO_MAX_ROWS"):  # tests: the indicator's padding agreed by an all-reduce instead
        from apt_ext.indicator import OverfittingIndicator

        sync_update = OverfittingIndicator.sync_update

        def without_bound(self, *a, **k):
            self.max_rows = None
            return sync_update(self, *a, **k)

        OverfittingIndicator.sync_update = without_bound
    train_apt_lora.quiet_libraries()
    args = parse_args_with_config(setup_parser(), rest)
    try:
        network = train_apt_lora.train(args)
    except train_apt_lora.Interrupted as e:  # the batches seen, then the exit code the trainer gives
        with open(os.path.join(ours.rank_out, f"rank{rank}_keys.json"), "w") as f:
            json.dump(seen, f)
        return e.exit_code
    _save(network.state_dict(), os.path.join(ours.rank_out, f"rank{rank}.safetensors"))
    if apt_holder:  # the APT overfitting indicator of this rank
        _save(apt_holder[0].state_dict(), os.path.join(ours.rank_out, f"rank{rank}_apt.safetensors"))
    with open(os.path.join(ours.rank_out, f"rank{rank}_keys.json"), "w") as f:
        json.dump(seen, f)
    with open(os.path.join(ours.rank_out, f"rank{rank}_rng.json"), "w") as f:
        json.dump(draws, f)
    print(f"rank {rank}: saved {os.path.join(ours.rank_out, f'rank{rank}.safetensors')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
