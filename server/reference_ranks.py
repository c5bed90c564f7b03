"""`shadowserve reference --tensor-parallel-size N`: the reference service over N ranks
(shadow/tensor_parallel.py). Rank 0 is the service as `run_reference` builds it for one
process; the other ranks only compute."""

from __future__ import annotations

import logging
import sys

from server.assembly import ExitCode, refusals_exit
from server.reference_app import ReferenceSettings


def run_ranks(settings: ReferenceSettings, serve) -> None:
    """Outside torchrun: launch N ranks on this node and exit with rank 0's code. Under
    torchrun (one node or several): be one rank. `serve(scorer)` runs the HTTP service on
    rank 0 until shutdown."""
    from shadow import tensor_parallel as tp

    size = settings.tensor_parallel_size
    if not tp.launched():
        sys.exit(tp.relaunch(size, sys.argv[1:]))
    if tp.world_size() != size:
        print(f"shadowserve reference: torchrun started {tp.world_size()} ranks, but --tensor-parallel-size is {size}: "
              "give torchrun --nnodes x --nproc-per-node = the tensor-parallel size", file=sys.stderr)
        sys.exit(ExitCode.REFUSED)
    with refusals_exit():
        ranks = tp.join(settings.device, settings.collective_timeout_s)
    if not ranks.leader:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks for the service
    scorer = _load(settings, ranks)
    tp.serving_timeout(settings.collective_timeout_s)
    if not ranks.leader:
        sys.exit(scorer.follow())
    scorer.start_heartbeat()
    try:
        serve(scorer)
    finally:
        scorer.stop_ranks()


def _load(settings: ReferenceSettings, ranks):
    from shadow.tensor_parallel import TensorParallelScorer

    with refusals_exit():
        scorer = TensorParallelScorer.load(settings.model, ranks, settings.name, settings.trust_remote_code,
                                           settings.collective_timeout_s)
        if settings.noise_dtype != "none":
            scorer.enable_noise_floor(settings.noise_dtype)
    return scorer
