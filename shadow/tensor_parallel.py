"""The fp32 reference over N tensor-parallel ranks (PyTorch distributed), for a model
larger than one device, with every device computing at once (a device map runs layers
in sequence). See docs/design.md, "A tensor-parallel reference".

- Launch: torchrun. One node: `shadowserve reference --tensor-parallel-size N` runs
  torchrun's standalone rendezvous itself (`relaunch`); several nodes: the operator runs
  torchrun on each (static rendezvous on the leader), and each rank runs the same command.
- Ranks: every rank holds 1/N of the fp32 weights (transformers' tensor-parallel plan,
  `tp_plan="auto"`, or PyTorch's API for the native InternLM2 forward) and 1/N of the
  noise copy. Global rank 0 serves HTTP; before each forward it broadcasts the call to the
  other ranks (`follow`), and every rank runs the same forward. The output head gathers
  the vocabulary, so rank 0 holds the full logits and extracts the statistics alone.
- Faults: one process group; the load runs under `LOAD_TIMEOUT_S`, serving under
  `--collective-timeout-s` (30 s, below the candidates' 60 s `--shadow-timeout-s`, so
  their call sees the 503, not its own timeout). Any failure once a batch has been
  broadcast ends the service: the ranks cannot safely be brought back in step. On gloo
  (CPU) a rank that dies fails rank 0's collective at once, one that hangs at the
  timeout: rank 0 answers 503 (an outage to the candidates, who keep their samples) and
  exits 1, and torchrun stops the rest. On NCCL (GPU) the watchdog aborts the process at
  the timeout instead: the candidates see the connection dropped, an outage all the
  same. While idle, rank 0 sends a heartbeat every quarter timeout and every rank
  acknowledges it (an all-reduce), so a rank lost while idle is found within one.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from shadow.local_scorer import LocalScorer, _dir_name, integrity_problems
from shadow.noise_floor import DTYPES
from shadow.scoring import ReferenceBusyError, ShadowReferenceError

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 7200.0  # loading shards of a large model, ranks skewed (transformers' own default)
EXIT_DELAY_S = 1.0  # lets the 503 that names the failure reach its client before the process goes
_SCORE, _PING, _STOP = "score", "ping", "stop"


class RanksFailedError(ReferenceBusyError):
    """A rank died or a collective timed out: this reference cannot score any more (503;
    the service exits)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks (torchrun's environment)."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def leader(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process is one of torchrun's workers."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def relaunch(size: int, argv: list[str]) -> int:
    """Run `python -m server.cli *argv` as `size` ranks on this node under torchrun's
    standalone rendezvous; this process is torchrun's agent: it stops every rank when one
    fails and on SIGTERM. The exit code is rank 0's, else the first failing rank's."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc-per-node={size}", "--module", "server.cli", *argv])
    except SignalException as exc:  # SIGTERM/SIGINT: torchrun has stopped every rank; a requested stop
        log.info("tensor parallel: stopped by %s", exc.sigval.name)
        return 0
    except ChildFailedError as exc:
        failures = exc.failures
        first = failures.get(0) or next(iter(failures.values()))
        return first.exitcode if first.exitcode and first.exitcode > 0 else 1
    return 0


def join(device: str, timeout_s: float) -> Ranks:
    """Join the process group torchrun set up the environment for (NCCL on CUDA, gloo on CPU)."""
    import torch.distributed as dist

    _die_with_parent()
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not cuda:  # transformers places a tensor-parallel model on any accelerator it sees
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    target = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        if local >= torch.cuda.device_count():
            raise ShadowReferenceError(f"rank {rank} is local rank {local}, but this node has "
                                       f"{torch.cuda.device_count()} GPU(s): start fewer ranks per node")
        torch.cuda.set_device(target)
        torch.backends.cuda.matmul.allow_tf32 = False  # TF32 rounds inputs to 10 mantissa bits: not fp32
        torch.backends.cudnn.allow_tf32 = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size,
                                timeout=timedelta(seconds=max(timeout_s, LOAD_TIMEOUT_S)),
                                device_id=target if cuda else None)
    return Ranks(rank, size, local, target)


def serving_timeout(timeout_s: float) -> None:
    """After the load: collectives fail after `timeout_s` (PyTorch has no public setter)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timedelta(seconds=timeout_s))


def _die_with_parent() -> None:
    """Linux: this rank gets SIGTERM when its launcher dies, even by SIGKILL (torchrun stops
    its ranks itself otherwise), so no rank outlives the service."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class TensorParallelScorer(LocalScorer):
    """A LocalScorer whose forwards run on every rank; only rank 0's is called from HTTP."""

    def __init__(self, model, tokenizer, name: str, ranks: Ranks, load_noise, timeout_s: float):
        super().__init__(model, tokenizer, name, ranks.device)
        self.ranks = ranks
        self._load_noise = load_noise  # dtype -> the model in that dtype, sharded the same way
        self._timeout_s = timeout_s
        self._can_mount = False
        self.broken: str | None = None
        self._stopped = threading.Event()
        self._collective = threading.Lock()  # one broadcast + its forward (or ping + ack) at a time

    mount_refusal = ("a tensor-parallel reference mounts no LoRA adapter: peft's LoRA layers are not sharded by "
                     "the tensor-parallel plan (their update would be added to 1/N of each output)")

    @classmethod
    def load(cls, model_dir: Path, ranks: Ranks, name: str | None = None, trust_remote_code: bool = False,
             timeout_s: float = 30.0) -> TensorParallelScorer:
        """Every rank calls this, in step."""
        from adapters.native import native_type

        if (kind := native_type(model_dir)) is not None:
            model, tokenizer, loaded_as, load_noise = _native(kind, model_dir, ranks)
        else:
            model, tokenizer, loaded_as, load_noise = _transformers(model_dir, ranks, trust_remote_code)
        scorer = cls(model, tokenizer, name or _dir_name(model_dir), ranks, load_noise, timeout_s)
        scorer.loaded_as = f"{loaded_as}, tensor parallel over {ranks.size} ranks"
        scorer.integrity_problems = integrity_problems(model)
        return scorer

    def enable_noise_floor(self, dtype: str) -> None:
        """Every rank: the serving-dtype copy loaded sharded as the fp32 one (a cast of the
        stored weights, as the one-process copy casts them: the same values)."""
        if dtype not in DTYPES:
            raise ShadowReferenceError(f"no noise floor for dtype '{dtype}' (one of {', '.join(DTYPES)})")
        with self._lock:
            self._noise_model = None if dtype == "float32" else self._load_noise(DTYPES[dtype]).eval()
            self.noise_dtype = dtype
        if self._noise_model is not None:  # loaded from the files again, not cast from the checked model
            self.integrity_problems += [f"noise copy: {p}" for p in integrity_problems(self._noise_model)]

    def add_adapter(self, name: str, path: Path) -> None:
        raise ShadowReferenceError(self.mount_refusal)

    # --- rank 0 -------------------------------------------------------------------------
    def _score(self, items, top_m, noise_top_k, adapter=None):
        """Everything that can refuse a request is checked before the broadcast; after it,
        any failure ends the service (the other ranks may be inside a collective)."""
        if self.broken is not None:
            raise RanksFailedError(f"the tensor-parallel reference has failed ({self.broken}); it is exiting")
        if adapter is not None:
            raise ShadowReferenceError(self.mount_refusal)
        if noise_top_k is not None and self.noise_dtype is None:
            raise ShadowReferenceError("the noise floor was asked for but is not enabled on this reference")
        with self._collective:
            try:
                self._send((_SCORE, items, top_m, noise_top_k))
                return super()._score(items, top_m, noise_top_k)
            except Exception as exc:
                self._fail(f"a batch failed on rank 0: {type(exc).__name__}: {exc}")
                raise RanksFailedError(f"the tensor-parallel reference has failed: a rank died or timed out, or the "
                                       f"batch failed ({exc}); it is exiting") from exc

    def start_heartbeat(self) -> None:
        """Rank 0: a ping to the waiting ranks every quarter timeout while no batch runs."""
        threading.Thread(target=self._beat, name="tp-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        every = max(1.0, min(30.0, self._timeout_s / 4))
        while not self._stopped.wait(every):
            if self.broken is not None or self._lock.locked():
                continue  # a batch runs: its collectives keep the ranks busy
            with self._collective:
                try:
                    self._send((_PING,))
                    self._ack()
                except Exception as exc:
                    self._fail(f"a rank stopped answering the heartbeat: {exc}")

    def stop_ranks(self) -> None:
        """Rank 0, at shutdown: the other ranks leave their loop and exit 0."""
        self._stopped.set()
        if self.broken is None:
            with self._collective:
                try:
                    self._send((_STOP,))
                except Exception as exc:
                    log.warning("tensor parallel: the other ranks did not take the stop: %s", exc)

    def _send(self, message: tuple) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([message], src=0, device=self.ranks.device)

    def _ack(self) -> None:
        """Every rank in one small all-reduce: returns once all have taken the last message."""
        import torch.distributed as dist

        dist.all_reduce(torch.zeros(1, device=self.ranks.device))
        if self.ranks.device.type == "cuda":
            torch.cuda.synchronize(self.ranks.device)

    def _fail(self, reason: str) -> None:
        """The process group is unusable: no later call can succeed. Exit 1 (torchrun stops
        the other ranks), after the reply that names the failure has gone out."""
        if self.broken is None:
            self.broken = reason
            log.error("tensor parallel: %s; exiting", reason)
            threading.Timer(EXIT_DELAY_S, os._exit, (1,)).start()

    # --- ranks 1..N-1 ---------------------------------------------------------------------
    def follow(self) -> int:
        """The other ranks: run every forward rank 0 runs, until it says stop. A broken
        process group (rank 0 gone or hung) ends this rank with exit code 1."""
        import torch.distributed as dist

        while True:
            box: list = [None]
            try:
                dist.broadcast_object_list(box, src=0, device=self.ranks.device)
                message = box[0]
                if message[0] == _STOP:
                    return 0
                if message[0] == _PING:
                    self._ack()
                elif message[0] == _SCORE:
                    _, items, top_m, noise_top_k = message
                    with self._lock:
                        LocalScorer._score(self, items, top_m, noise_top_k)
            except Exception as exc:  # rank 0 gone or hung, or this rank's forward failed: leave
                log.error("tensor parallel: rank %d leaves the group: %s: %s", self.ranks.rank, type(exc).__name__, exc)
                return 1


def _transformers(model_dir: Path, ranks: Ranks, trust_remote_code: bool):
    """transformers' own tensor-parallel plan for the model's class."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.distributed import DistributedConfig

    from adapters.model_dir import exact_attention
    from shadow.remote_code import remote_code_allowed, remote_code_explained

    trust = remote_code_allowed(model_dir, trust_remote_code)

    def load(dtype: torch.dtype):
        try:
            with remote_code_explained(model_dir, trust):
                return AutoModelForCausalLM.from_pretrained(
                    model_dir, dtype=dtype, trust_remote_code=trust, **exact_attention(model_dir),
                    distributed_config=DistributedConfig(tp_plan="auto", tp_size=ranks.size)).eval()
        except (ValueError, NotImplementedError, KeyError) as exc:
            raise ShadowReferenceError(f"{model_dir}: transformers cannot shard this model over {ranks.size} ranks "
                                       f"(its tensor-parallel plan): {exc}") from exc

    _check_plan(model_dir, trust)
    model = load(torch.float32)
    _check_sharded(model, model_dir, ranks.size)
    with remote_code_explained(model_dir, trust):
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
    return model, tokenizer, f"transformers {type(model).__name__} (its tensor-parallel plan)", load


def _check_plan(model_dir: Path, trust: bool) -> None:
    """Before any weight loads: the model's class has a tensor-parallel plan for its layers
    (many classes have one for the output head only, and would load whole on every rank)."""
    from transformers import AutoConfig

    from shadow.remote_code import remote_code_explained

    try:
        with remote_code_explained(model_dir, trust):
            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
    except (ValueError, KeyError, OSError) as exc:
        raise ShadowReferenceError(f"{model_dir}: transformers cannot read its config: {exc}") from exc
    text = getattr(config, "text_config", None) or config
    if not (getattr(config, "base_model_tp_plan", None) or getattr(text, "base_model_tp_plan", None)):
        raise ShadowReferenceError(f"{model_dir}: transformers has no tensor-parallel plan for {config.model_type}'s "
                                   "layers; serve it on one device, or across devices with --max-memory (a device map)")


MAX_UNSHARDED = 0.5  # of the weights' bytes: embeddings and norms, not whole layers


def _check_sharded(model, model_dir: Path, size: int) -> None:
    """After the load: most weight bytes are cut over the ranks (a plan that misses the
    layers would hold the whole model on every rank, silently)."""
    from torch.distributed.tensor import DTensor, Shard

    total = unsharded = 0
    for param in model.parameters():
        nbytes = param.numel() * param.element_size()
        total += nbytes
        if not (isinstance(param, DTensor) and any(isinstance(p, Shard) for p in param.placements)):
            unsharded += nbytes
    if total and unsharded / total > MAX_UNSHARDED:
        raise ShadowReferenceError(f"{model_dir}: transformers' tensor-parallel plan leaves {unsharded / total:.0%} of "
                                   f"the weights whole on each of the {size} ranks; serve it on one device, or with "
                                   "--max-memory (a device map)")


def _native(kind: str, model_dir: Path, ranks: Ranks):
    """The project's native forward, sharded with PyTorch's tensor-parallel API."""
    from torch.distributed.device_mesh import init_device_mesh

    from adapters.errors import AdapterError
    from adapters.native import DESCRIPTIONS
    from adapters.native.internlm2_tp import load_parallel
    from adapters.native.vocab import load_vocab

    if kind != "internlm2":
        raise ShadowReferenceError(f"{model_dir}: the native {kind} forward has no tensor-parallel plan")
    mesh = init_device_mesh(ranks.device.type, (ranks.size,))

    def load(dtype: torch.dtype):
        try:
            return load_parallel(model_dir, dtype, ranks.device, mesh)
        except AdapterError as exc:
            raise ShadowReferenceError(str(exc)) from exc

    return load(torch.float32), load_vocab(model_dir), DESCRIPTIONS[kind], load

