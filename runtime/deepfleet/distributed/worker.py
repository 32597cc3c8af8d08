"""A tensor-parallel worker process (ranks 1..N-1): `python -m deepfleet.distributed.worker RANK FD`.

It reads its RunnerSpec from the socket FD, answers "start" (imports done), joins the process group, builds its
ModelRunner (its slice of the weights) and answers "load". Then it serves the driver's messages:
("execute", StepInputs) runs a step (no answer: the collectives keep the ranks in step; under async
scheduling it first receives the previous step's sampled tokens by broadcast), ("call", method, args)
runs a runner method and answers (ok, value); ("stop",) or a closed socket ends it. A heartbeat thread marks it
alive in shared memory for the driver's watchdog."""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import time
from multiprocessing.connection import Connection

import torch

from deepfleet.distributed import parallel_state as ps
from deepfleet.distributed.executor import Heartbeats, RunnerSpec, device_for

log = logging.getLogger("deepfleet.distributed.worker")
_BEAT_S = 0.5


def build_runner(spec: RunnerSpec, rank: int):
    from deepfleet.engine.model_runner import ModelRunner
    from deepfleet.models.config import load_config

    device = device_for(spec.device_type, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return ModelRunner(load_config(spec.model), spec.dtype, device, spec.max_model_len, spec.block_size,
                       spec.enforce_eager, spec.load_format, spec.quantization, mtp_layers=spec.mtp_layers,
                       kv_cache_dtype=spec.kv_cache_dtype)


def _heartbeat(beats: Heartbeats, rank: int) -> None:
    while True:
        beats.beat(rank)
        time.sleep(_BEAT_S)


def serve(rank: int, conn: Connection) -> None:
    spec: RunnerSpec = conn.recv()
    torch.set_num_threads(spec.num_threads)
    beats = Heartbeats(spec.size, name=os.environ["DEEPFLEET_TP_HEARTBEATS"])
    threading.Thread(target=_heartbeat, args=(beats, rank), daemon=True).start()
    conn.send((True, None))  # started
    try:
        if spec.device_type == "cuda":
            torch.cuda.set_device(rank)  # before NCCL: its communicator binds the current device
        ps.init(rank, spec.size, spec.init_method, device_for(spec.device_type, rank), spec.timeout_s,
                spec.expert_parallel)
        runner = build_runner(spec, rank)
    except Exception as e:
        conn.send((False, f"{type(e).__name__}: {e}"))
        raise
    conn.send((True, None))
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the driver is gone
        if message[0] == "stop":
            return
        if message[0] == "execute":
            inputs = message[1]
            prev = None
            if inputs.prev_rows:  # the driver's sampled tokens of the step before, for this step's placeholders
                prev = ps.broadcast(torch.empty(inputs.prev_rows, dtype=torch.long, device=runner.device))
            runner.execute(inputs.scheduler_output(), prev)
            continue
        _, name, args = message
        try:
            conn.send((True, getattr(runner, name)(*args)))
        except Exception as e:
            conn.send((False, f"{type(e).__name__}: {e}"))
            raise


def main() -> None:
    rank, fd = int(sys.argv[1]), int(sys.argv[2])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s [tp rank {rank}]: %(message)s")
    code = 0
    try:
        serve(rank, Connection(fd))
    except BaseException:
        log.exception("worker failed")
        code = 1
    finally:
        # no interpreter clean-up: a process group or CUDA context left by a failed peer can hang it
        logging.shutdown()
        os._exit(code)


if __name__ == "__main__":
    main()
