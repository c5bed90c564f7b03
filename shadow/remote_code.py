"""The remote-code policy, for every loader (the candidate's and the reference's): a
model's own Python code runs only with `--trust-remote-code`, only from inside its
directory, and when it fails the error says where, under which transformers, and what
to do instead."""

from __future__ import annotations

import json
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters.model_dir import read_config


class RemoteCodeError(RuntimeError):
    """The model needs its own Python code and `--trust-remote-code` was not given, or its
    code lives outside the model directory. Raised for the candidate's loaders as much as
    the reference's, so not a ShadowReferenceError: a handler that turns the reference's
    load errors into its message and exit code names this one beside it."""


class RemoteCodeFailedError(RemoteCodeError):
    """The model's own code was allowed to run and raised while loading."""


TRUST_FLAG = "--trust-remote-code"
# Layouts shadowserve scores with its own forward (adapters/native), with no remote code.
NATIVE_HINT = "shadowserve scores InternLM2 originals (model_type internlm2) with its own forward, no remote code needed"


def local_code_only(model_dir: Path) -> bool:
    """Whether config.json's auto_map names code, all of it in `model_dir` itself.

    Returns True when the auto_map names modules present in `model_dir`, False when
    there is no auto_map, and refuses code from anywhere else."""
    config = read_config(model_dir)
    if not config.get("auto_map"):
        return False
    # The tokenizer's auto_map too: with trust on, AutoTokenizer would fetch what it names.
    targets = [*config["auto_map"].values(), *_tokenizer_auto_map(model_dir).values()]
    for target in targets:
        for ref in [target] if isinstance(target, str) else [t for t in target if t]:
            if "--" in ref:
                raise RemoteCodeError(f"{model_dir}: auto_map '{ref}' points to code outside the directory; refusing")
            module = ref.rsplit(".", 1)[0]
            if not (model_dir / f"{module.replace('.', '/')}.py").is_file():
                raise RemoteCodeError(f"{model_dir}: auto_map names {module}.py, which is not in the directory")
    return True


def _tokenizer_auto_map(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    return (json.loads(path.read_text()).get("auto_map") or {}) if path.is_file() else {}


def remote_code_allowed(model_dir: Path, trust: bool) -> bool:
    """The `trust_remote_code` to load `model_dir` with: only with the explicit flag, and
    then only for code inside the directory (nothing is downloaded). A model whose type
    transformers knows loads natively without it (an auto_map left in its config is
    ignored). Raises RemoteCodeError, naming the flag, when the model cannot load so."""
    config = read_config(model_dir)
    if not config.get("auto_map"):
        return False
    if not trust:
        from transformers import CONFIG_MAPPING

        if config.get("model_type") in CONFIG_MAPPING:
            return False
        raise RemoteCodeError(
            f"{model_dir}: model type '{config.get('model_type')}' needs the Python code in its directory "
            f"(config.json auto_map); it runs only with {TRUST_FLAG} (off by default: it executes that code)"
        )
    return local_code_only(model_dir)


@contextmanager
def remote_code_explained(model_dir: Path, trust: bool) -> Iterator[None]:
    """Around a transformers load with `trust_remote_code=trust`: an exception raised inside
    the directory's own code becomes a RemoteCodeFailedError naming the file, the line, the
    installed transformers and the ways out, instead of a bare `KeyError: 'type'`."""
    try:
        yield
    except RemoteCodeError:
        raise
    except Exception as exc:
        frame = _own_code_frame(exc, model_dir) if trust else None
        if frame is None:
            raise
        import transformers

        raise RemoteCodeFailedError(
            f"{model_dir}: its own code failed while loading, under transformers {transformers.__version__}: "
            f"{Path(frame.filename).name}, line {frame.lineno}, in {frame.name}: `{(frame.line or '').strip()}` "
            f"raised {type(exc).__name__}: {exc}. The code was written for another transformers version "
            f"(InternLM2's released code, for one, predates transformers 5). Ways out: convert the checkpoint to a "
            f"layout transformers loads natively (`shadowserve convert`); or run this reference as its own service "
            f"under the transformers it was written for (`shadowserve reference` there, --shadow-reference-url here). "
            f"{NATIVE_HINT}."
        ) from exc


def _own_code_frame(exc: BaseException, model_dir: Path) -> traceback.FrameSummary | None:
    """The innermost frame of the traceback in one of the directory's Python files
    (transformers runs them from a copy in its modules cache, so match by name there)."""
    own = {p.name for p in model_dir.glob("*.py")}
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = Path(frame.filename)
        if path.name in own and (path.parent.resolve() == model_dir.resolve() or "transformers_modules" in path.parts):
            return frame
    return None
