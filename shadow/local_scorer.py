"""The local reference: a Hugging Face model in fp32 (optionally + an unmerged PEFT
adapter), teacher-forced in padded batches. Used in-process by the server (default)
and behind `shadowserve reference`. With the noise floor enabled it also holds the same
model in the candidate's serving dtype and runs it over the same batch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from shadow.compare import PositionStats
from shadow.noise_floor import DTYPES, fp32_accumulation, serving_dtype_copy
from shadow.remote_code import remote_code_allowed, remote_code_explained
from shadow.scoring import ReferenceBusyError, ScoredSequence, ScoreItem, ShadowReferenceError, VocabInfo, vocab_fingerprint


class LocalScorer:
    cancellable = False  # a forward in progress cannot be abandoned (see Scorer.cancellable)
    ready = True  # in process: there from load to close (see Scorer.ready)
    token_caps: tuple[int | None, int | None] = (None, None)  # none of its own: the settings' budgets bound it
    state: str | None = None  # no connection to track (see Scorer.state)
    reachable = True  # in process: always answers (see Scorer.reachable)

    def __init__(self, model, tokenizer, name: str, device: torch.device):
        self._model = model
        self.name = name
        self.vocab: VocabInfo = vocab_fingerprint(tokenizer)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._device = device
        self._lock = threading.Lock()  # one forward at a time, also across timed-out calls
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference")
        self._free_thread: ThreadPoolExecutor | None = None  # every core, for an idle engine (confine)
        self._run_free = False
        self._keeps_logits = True  # until the model's forward refuses `logits_to_keep`
        self.noise_dtype: str | None = None
        self._noise_model = None  # the reference in the serving dtype (None for float32: the fp32 rows serve)
        self.device_map: dict | None = None  # accelerate's placement, when spread across devices
        self.loaded_as = type(model).__name__  # how the model was loaded, for reports
        self.integrity_problems: list[str] = []  # parameters or buffers unmaterialised or non-finite
        self.mounted: list[str] = []  # LoRA adapters mounted (add_adapter), applied per batch, unmerged
        self._can_mount = True  # False for the native forward, and for a reference that is base + an adapter already

    @classmethod
    def load(
        cls, model_dir: Path, adapter: Path | None = None, device: str = "auto", name: str | None = None,
        trust_remote_code: bool = False, max_memory: dict[int | str, str] | None = None,
    ) -> LocalScorer:
        """`max_memory` (accelerate's: {0: "70GiB", "cpu": "200GiB", ...}) places the model
        across those devices with accelerate's device map instead of on `device`."""
        from adapters.model_dir import check_model_dir
        from adapters.native import native_type

        check_model_dir(model_dir, error=ShadowReferenceError)
        if (kind := native_type(model_dir)) is not None:
            scorer = cls._load_native(kind, model_dir, adapter, device, name, max_memory)
        else:
            scorer = cls._load_transformers(model_dir, adapter, device, name, trust_remote_code, max_memory)
        # accelerate's offload keeps offloaded weights on the meta device, and loads them per forward
        scorer.integrity_problems = integrity_problems(scorer._model, meta_allowed=scorer.device_map is not None)
        return scorer

    @classmethod
    def _load_transformers(cls, model_dir: Path, adapter: Path | None, device: str, name: str | None,
                           trust_remote_code: bool, max_memory: dict | None) -> LocalScorer:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from adapters.model_dir import exact_attention

        trust = remote_code_allowed(model_dir, trust_remote_code)
        device_map = None
        with remote_code_explained(model_dir, trust):
            if max_memory:
                from shadow.placement import load_placed

                model, device_map = load_placed(model_dir, max_memory, trust)
                target = model.device  # inputs go where the embeddings are; accelerate's hooks move the rest
            else:
                target = _device(device)
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust,
                                                             **exact_attention(model_dir)).to(target)
            tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
        loaded_as = f"transformers {type(model).__name__}" + (" (the directory's own code)" if trust else "")
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)  # kept unmerged: the exact reference
            loaded_as += " + the unmerged adapter (peft)"
        default_name = _dir_name(model_dir) + (f"+{_dir_name(adapter)}" if adapter else "")
        scorer = cls(model.eval(), tokenizer, name or default_name, target)
        scorer.device_map = device_map
        scorer.loaded_as = loaded_as
        scorer._can_mount = adapter is None
        return scorer

    @classmethod
    def _load_native(cls, kind: str, model_dir: Path, adapter: Path | None, device: str, name: str | None,
                     max_memory: dict | None) -> LocalScorer:
        """A released layout transformers has no class for (InternLM2), by the project's own
        forward: its remote code, if any, is not run."""
        from adapters.errors import AdapterError
        from adapters.native import DESCRIPTIONS, NATIVE
        from adapters.native.vocab import load_vocab

        if adapter is not None:
            raise ShadowReferenceError(
                f"{model_dir}: an unmerged PEFT adapter on the native {kind} forward is not supported; "
                f"convert the base first (shadowserve convert {kind}-to-llama) and use the adapter on that")
        if max_memory:
            raise ShadowReferenceError(
                f"{model_dir}: the native {kind} forward runs on one device (--shadow-reference-device); "
                "placement across devices (max memory) needs a transformers model: convert it first")
        target = _device(device)
        try:
            model = NATIVE[kind](model_dir, torch.float32, target)
            tokenizer = load_vocab(model_dir)
        except AdapterError as exc:
            raise ShadowReferenceError(str(exc)) from exc
        scorer = cls(model, tokenizer, name or _dir_name(model_dir), target)
        scorer.loaded_as = DESCRIPTIONS[kind]
        scorer._can_mount = False
        return scorer

    def enable_noise_floor(self, dtype: str) -> None:
        """Blocking: a copy of the reference in the serving dtype (none for float32: the
        noise floor of an fp32 candidate is the fp32 reference itself, exactly)."""
        if dtype not in DTYPES:
            raise ShadowReferenceError(f"no noise floor for dtype '{dtype}' (one of {', '.join(DTYPES)})")
        from shadow.placement import offloaded

        if dtype != "float32" and self.device_map is not None and offloaded(self.device_map):
            raise ShadowReferenceError(
                "the noise floor needs the reference's weights resident: this device map offloads some of them "
                "(to disk, or to CPU beside GPUs); give the devices more memory, or turn the noise floor off")
        with self._lock:
            self._noise_model = None if dtype == "float32" else serving_dtype_copy(self._model, dtype)
            self.noise_dtype = dtype

    def add_adapter(self, name: str, path: Path) -> None:
        """Blocking: mount a PEFT LoRA adapter, unmerged: in fp32 on the reference, and in
        the serving dtype on its noise-floor copy (base + adapter as a low-precision engine
        runs it). Every adapter shares the one base in memory; `score(adapter=name)` applies it."""
        if not self._can_mount:
            raise ShadowReferenceError(f"{self.name} ({self.loaded_as}) cannot mount LoRA adapters: "
                                       "mounted adapters need a transformers reference without --shadow-reference-adapter")
        if name in self.mounted:
            raise ShadowReferenceError(f"the adapter {name} is mounted on the reference already")
        with self._lock:
            try:
                self._model = _mount(self._model, name, path, torch.float32)
                if self._noise_model is not None:
                    self._noise_model = _mount(self._noise_model, name, path, DTYPES[self.noise_dtype])
                bad = [f"{n} holds NaN/inf" for n, p in self._model.named_parameters()
                       if _of_adapter(n, name) and not torch.isfinite(p).all()]
                if bad:
                    raise ShadowReferenceError("; ".join(bad[:MAX_INTEGRITY_PROBLEMS]))
            except Exception as exc:  # all or nothing: the reference as it was before
                self._unmount(name)
                raise ShadowReferenceError(f"the reference could not mount the adapter {name} from {path}: {exc}") from exc
            self.mounted.append(name)

    def remove_adapter(self, name: str) -> None:
        """Blocking: drop a mounted adapter's weights (between forwards)."""
        with self._lock:
            if name in self.mounted:
                self._unmount(name)
                self.mounted.remove(name)

    def _unmount(self, name: str) -> None:
        """`name` out of both models. The last adapter's removal unwraps the model (peft's
        unload: its LoRA layers out, nothing merged), so the base runs as it was loaded; a
        first mount that failed half-way (peft inserts the layers before it reads the
        weights) leaves a bare model with LoRA layers in it: they are taken out."""
        from peft import PeftModel

        for attr in ("_model", "_noise_model"):
            model = getattr(self, attr)
            if model is None:
                continue
            if not isinstance(model, PeftModel):
                _strip_lora_layers(model)
            elif name in model.peft_config:
                if len(model.peft_config) == 1:
                    setattr(self, attr, model.unload())
                else:
                    model.delete_adapter(name)

    def _active(self, adapter: str | None):
        """The reference (and its noise copy) with `adapter` applied, or with every
        mounted adapter off for the base's requests."""
        if adapter is None and not self.mounted:
            return contextlib.nullcontext()
        if adapter is not None and adapter not in self.mounted:
            raise ShadowReferenceError(f"the adapter {adapter} is not mounted on the reference")
        stack = contextlib.ExitStack()
        for model in (self._model, self._noise_model):
            if model is None:
                continue
            if adapter is None:
                stack.enter_context(model.disable_adapter())
            else:
                model.set_adapter(adapter)
        return stack

    async def score(self, items: list[ScoreItem], top_m: int, noise_top_k: int | None = None,
                    adapter: str | None = None) -> list[ScoredSequence]:
        """Refuses at once while an earlier pass still runs (one that timed out keeps its
        thread), so a slow reference sheds load instead of piling up forward passes."""
        if not self._lock.acquire(blocking=False):
            raise ReferenceBusyError("the reference is still busy with an earlier batch")
        loop = asyncio.get_running_loop()
        thread = self._free_thread if self._run_free and self._free_thread is not None else self._thread
        return await loop.run_in_executor(thread, self._score_locked, items, top_m, noise_top_k, adapter)

    async def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        if self._free_thread is not None:
            self._free_thread.shutdown(wait=False, cancel_futures=True)

    def throttle(self, held_back: bool) -> None:
        """The next forwards run confined (the engine has requests) or on every core (it
        is idle). Two worker threads, one per setting, set up once by `confine`: torch's
        thread count is never changed again, so nothing else in the process sees it move."""
        self._run_free = not held_back

    def confine(self, threads: int = 1, nice: int = 10) -> None:
        """Blocking: a bounded share of the host for `score`'s forwards, which all run on
        this scorer's one worker thread. `threads` torch intra-op threads for that thread
        only (0: unchanged), and its scheduling priority lowered by `nice` (Linux: a
        thread's own; the OpenMP threads it starts later inherit it).

        torch.set_num_threads is per thread for threads that already ran an op but also
        sets the default of threads that have not yet: the caller's value is put back, so
        the rest of the process (the transformers engine, whose threads start later)
        keeps torch's default. `score_sync` runs in the caller's thread, unconfined.

        A second worker thread, at the same lowered priority with torch's default thread
        count (every core), takes the forwards `throttle(False)` lets run free."""
        before = torch.get_num_threads()
        self.thread_id = self._thread.submit(_confine_this_thread, threads, nice).result()
        if threads:
            torch.set_num_threads(before)
        self._free_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-free")
        self._free_thread.submit(_confine_this_thread, before, nice).result()

    def _score_locked(self, items: list[ScoreItem], top_m: int, noise_top_k: int | None,
                      adapter: str | None = None) -> list[ScoredSequence]:
        try:
            return self._score(items, top_m, noise_top_k, adapter)
        finally:
            self._lock.release()

    def score_sync(self, items: list[ScoreItem], top_m: int, noise_top_k: int | None = None,
                   adapter: str | None = None) -> list[ScoredSequence]:
        """Blocking, for benchmarks and tests: waits for the reference to be free."""
        with self._lock:
            return self._score(items, top_m, noise_top_k, adapter)

    def _score(self, items: list[ScoreItem], top_m: int, noise_top_k: int | None,
               adapter: str | None = None) -> list[ScoredSequence]:
        if noise_top_k is not None and self.noise_dtype is None:
            raise ShadowReferenceError("the noise floor was asked for but is not enabled on this reference")
        with torch.inference_mode(), self._active(adapter):
            sequences = [item.prompt_ids + item.output_ids[:-1] for item in items]
            width = max(len(s) for s in sequences)
            input_ids = torch.full((len(items), width), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(items), width), dtype=torch.long)
            for row, seq in enumerate(sequences):  # right padding: real positions keep 0..n-1
                input_ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            # Only completion positions need logits: skip the LM head over the prompts.
            first = min(len(item.prompt_ids) for item in items) - 1
            input_ids, mask = input_ids.to(self._device), mask.to(self._device)
            logits = self._forward(self._model, input_ids, mask, first)
            noise_logits = None
            if noise_top_k is not None and self._noise_model is not None:
                with fp32_accumulation(self._device):
                    noise_logits = self._forward(self._noise_model, input_ids, mask, first)
            return [
                self._positions(logits[row], None if noise_logits is None else noise_logits[row], item, top_m,
                                noise_top_k, first)
                for row, item in enumerate(items)
            ]

    def _forward(self, model, input_ids: torch.Tensor, mask: torch.Tensor, first: int) -> torch.Tensor:
        """Logits from position `first` on; models without `logits_to_keep` compute all."""
        wanted = input_ids.shape[1] - first
        if self._keeps_logits:
            keep = torch.arange(first, input_ids.shape[1], device=input_ids.device)
            try:
                logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=keep).logits
                # A forward taking **kwargs may ignore the argument and return every position.
                return logits if logits.shape[1] == wanted else logits[:, first:]
            except TypeError:
                self._keeps_logits = False
        return model(input_ids=input_ids, attention_mask=mask).logits[:, first:]

    @staticmethod
    def _positions(
        logits: torch.Tensor, noise_logits: torch.Tensor | None, item: ScoreItem, top_m: int,
        noise_top_k: int | None, first: int,
    ) -> ScoredSequence:
        start = len(item.prompt_ids) - 1 - first  # logits at t predict token t + 1
        span = slice(start, start + len(item.output_ids))
        # Log-softmax in fp32 (as vLLM computes raw log-probs, whatever the model dtype);
        # the comparison maths turns these into float64.
        rows = torch.log_softmax(logits[span].float(), dim=-1).cpu()
        top_lp, top_ids = torch.topk(rows, top_m, dim=-1)
        noise = None
        if noise_top_k is not None:
            noise_rows = rows if noise_logits is None else torch.log_softmax(noise_logits[span].float(), dim=-1).cpu()
            noise_lp, noise_ids = torch.topk(noise_rows, noise_top_k, dim=-1)
            noise = []
            for i, token in enumerate(item.output_ids):
                entry = dict(zip(noise_ids[i].tolist(), noise_lp[i].tolist()))
                entry[token] = float(noise_rows[i, token])
                noise.append(entry)
        reference = []
        for i, ids in enumerate(item.candidate_ids):
            wanted = list(dict.fromkeys([*ids, *(noise[i] if noise else ())]))
            values = rows[i, wanted].tolist()
            reference.append(PositionStats(dict(zip(wanted, values)), top_ids[i].tolist(), top_lp[i].tolist()))
        return ScoredSequence(reference, noise)


def _mount(model, name: str, path: Path, dtype: torch.dtype):
    """`model` with the LoRA adapter at `path` added as `name` (wrapped in a PeftModel on
    the first one; the base modules are shared, not copied), its weights in `dtype`."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(path), adapter_name=name, autocast_adapter_dtype=False)
    else:
        model = PeftModel.from_pretrained(model, str(path), adapter_name=name, autocast_adapter_dtype=False)
    for key, param in model.named_parameters():
        if _of_adapter(key, name) and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model.eval()


def _strip_lora_layers(model: torch.nn.Module) -> None:
    """Every peft layer in a bare model replaced by the base layer it wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(parent, child_name, child.get_base_layer())


def _of_adapter(parameter: str, adapter: str) -> bool:
    """peft names an adapter's weights `....lora_A.<adapter>.weight` (and lora_B)."""
    return f".lora_A.{adapter}." in parameter or f".lora_B.{adapter}." in parameter


def _device(device: str) -> torch.device:
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)


MAX_INTEGRITY_PROBLEMS = 8


def integrity_problems(model: torch.nn.Module, meta_allowed: bool = False) -> list[str]:
    """Parameters and buffers that were never materialised (still on the meta device) or
    hold NaN/inf: a reference with any of them computes garbage, silently. Uninitialised
    memory that happens to be finite is not seen here; the probe's perplexity sees it."""
    problems = []
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_meta:
                if not meta_allowed:
                    problems.append(f"{kind} {name} was never materialised (meta device)")
            elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                problems.append(f"{kind} {name} holds non-finite values")
            if len(problems) >= MAX_INTEGRITY_PROBLEMS:
                return [*problems, "(and possibly more)"]
    return problems


def _confine_this_thread(threads: int, nice: int) -> int:
    tid = threading.get_native_id()
    if nice and hasattr(os, "setpriority"):
        try:  # on Linux, PRIO_PROCESS with a thread id sets that thread's nice value only
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except OSError as exc:
            logging.getLogger(__name__).warning("shadow: could not lower the reference thread's priority: %s", exc)
    if threads:
        torch.get_num_threads()  # this thread's pool size is set up on first use: do it first, or it would undo ours
        torch.set_num_threads(threads)
    return tid


def _dir_name(path: Path) -> str:
    """A directory's own name, also when given as `.` or `models/x/` (symlinks not followed):
    the reference's name on every series and in engine calibrations."""
    return Path(os.path.abspath(path)).name
