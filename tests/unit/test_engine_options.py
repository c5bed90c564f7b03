"""vLLM engine options (issue 11, item 1): the parallel layout checked against the model's
heads and layers, `--engine-arg` parsed by vLLM's own parser, mistakes refused at start."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from server.settings import ServeSettings
from server.vllm_args import EngineArgError, check_parallel, check_platform, parse_engine_args

# SmolLM2-135M: 9 query heads, 3 KV heads, 30 layers. InternLM2-20B: 48 / 8 / 48.
SMOLLM2 = {"num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30}
INTERNLM2_20B = {"num_attention_heads": 48, "num_key_value_heads": 8, "num_hidden_layers": 48}


@pytest.mark.parametrize(("config", "tp", "pp"), [
    (SMOLLM2, 1, 1), (SMOLLM2, 3, 1), (SMOLLM2, 9, 1), (SMOLLM2, 1, 2), (SMOLLM2, 3, 30),
    (INTERNLM2_20B, 2, 1), (INTERNLM2_20B, 8, 1), (INTERNLM2_20B, 16, 1), (INTERNLM2_20B, 4, 4),
])
def test_layouts_vllm_can_split(config, tp, pp):
    check_parallel(config, tp, pp)


def test_tensor_degree_two_on_smollm2_names_the_head_counts():
    with pytest.raises(EngineArgError) as info:
        check_parallel(SMOLLM2, 2, 1)
    message = str(info.value)
    assert "--tensor-parallel-size 2" in message and "9 attention heads" in message and "3 KV heads" in message
    assert "[1, 3, 9]" in message  # the degrees that would work


def test_kv_heads_that_neither_divide_nor_are_divided_are_refused():
    with pytest.raises(EngineArgError, match="8 KV heads"):
        check_parallel(INTERNLM2_20B, 3, 1)  # 48 % 3 == 0, but 8 and 3 share nothing


def test_more_pipeline_stages_than_layers_is_refused():
    with pytest.raises(EngineArgError, match="only 30 layers"):
        check_parallel(SMOLLM2, 1, 31)


def test_engine_args_are_typed_by_vllms_parser():
    parsed = parse_engine_args(["block_size=32", "max-num-batched-tokens=4096", "enable_chunked_prefill=false",
                                "kv_cache_dtype=auto"])
    assert parsed == {"block_size": 32, "max_num_batched_tokens": 4096, "enable_chunked_prefill": False,
                      "kv_cache_dtype": "auto"}


@pytest.mark.parametrize(("pair", "expected"), [
    ("blok_size=32", "not a vLLM engine argument; did you mean block_size"),
    ("block_size=big", "invalid int value: 'big'"),
    ("kv_cache_dtype=fp7", "invalid choice: 'fp7'"),
    ("enable_chunked_prefill=maybe", "expected true or false"),
    ("block_size", "expected KEY=VALUE"),
    ("dtype=float16", "set by shadowserve, use --dtype"),
    ("logprobs_mode=processed_logprobs", "the shadow compares raw log-probs"),
    ("tensor-parallel-size=2", "use --tensor-parallel-size"),
])
def test_bad_engine_args_say_what_is_wrong(pair, expected):
    with pytest.raises(EngineArgError) as info:
        parse_engine_args([pair])
    assert expected in str(info.value)


def test_the_same_engine_arg_twice_is_refused():
    with pytest.raises(EngineArgError, match="given twice"):
        parse_engine_args(["block_size=16", "block-size=32"])


def test_settings_refuse_vllm_options_on_the_transformers_engine(demo_model):
    with pytest.raises(ValidationError, match="--tensor-parallel-size, --engine-arg: vLLM engine options"):
        ServeSettings(model=demo_model, engine="transformers", tensor_parallel_size=3, engine_arg=["block_size=32"])


def test_settings_check_the_layout_against_the_model(demo_model):
    with pytest.raises(ValidationError, match="9 attention heads"):
        ServeSettings(model=demo_model, tensor_parallel_size=2)
    with pytest.raises(ValidationError, match="not a vLLM quantization method"):
        ServeSettings(model=demo_model, quantization="awk")
    settings = ServeSettings(model=demo_model, tensor_parallel_size=3, pipeline_parallel_size=2,
                             distributed_executor_backend="mp", quantization="fp8", max_num_seqs=8,
                             enable_prefix_caching=True, engine_arg=["block_size=32"])
    assert (settings.tensor_parallel_size, settings.engine_arg) == (3, ["block_size=32"])


def test_engine_receives_every_option(demo_model, monkeypatch):
    """What reaches vLLM's AsyncEngineArgs (the engine is not started: narrow unit)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from server.engines.vllm_engine import VllmEngine

    class Captured(Exception):
        pass

    def capture(args, *a, **k):
        raise Captured(args)

    monkeypatch.setattr(AsyncLLM, "from_engine_args", staticmethod(capture))
    settings = ServeSettings(model=demo_model, tensor_parallel_size=3, pipeline_parallel_size=2,
                             distributed_executor_backend="mp", max_num_seqs=8, enable_prefix_caching=False,
                             engine_arg=["block_size=32", "max_num_batched_tokens=1024"])
    with pytest.raises(Captured) as info:
        VllmEngine.load(settings)
    args = info.value.args[0]
    assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.distributed_executor_backend) == (3, 2, "mp")
    assert (args.max_num_seqs, args.enable_prefix_caching, args.block_size, args.max_num_batched_tokens) == \
        (8, False, 32, 1024)
    assert args.logprobs_mode == "raw_logprobs" and args.quantization is None  # unset: vLLM's default


def test_cli_stops_before_loading_with_the_reason(demo_model, tmp_path):
    """`serve --tensor-parallel-size 2` on SmolLM2: exit 2, the head counts named, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(demo_model), "--tensor-parallel-size", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "9 attention heads" in result.stderr and "Traceback" not in result.stderr


def test_config_of_a_multimodal_model_uses_its_text_config(tmp_path):
    """Vision-language configs keep the decoder's heads under text_config."""
    (tmp_path / "config.json").write_text(json.dumps({"text_config": SMOLLM2}))
    with pytest.raises(ValidationError, match="9 attention heads"):
        ServeSettings(model=tmp_path, tensor_parallel_size=2)


def test_verify_hands_its_engine_the_same_vllm_options(demo_model):
    """verify takes serve's vLLM options and builds the engine from them; a bad layout stops
    it while its flags are read, before the reference loads."""
    from server.verify.settings import VerifySettings

    settings = VerifySettings(candidate=demo_model, reference=demo_model, tensor_parallel_size=3,
                              pipeline_parallel_size=2, enforce_eager=False, max_num_seqs=4, engine_arg=["block_size=32"],
                              reference_max_memory="cpu=2GiB")
    engine = settings.engine_settings("candidate")
    assert (engine.tensor_parallel_size, engine.pipeline_parallel_size, engine.max_num_seqs, engine.engine_arg) == \
        (3, 2, 4, ["block_size=32"])
    assert (engine.model, engine.model_name, engine.max_logprobs) == (demo_model, "candidate", settings.top_k)
    with pytest.raises(ValidationError, match="9 attention heads"):
        VerifySettings(candidate=demo_model, reference=demo_model, tensor_parallel_size=2)
    with pytest.raises(ValidationError, match="vLLM engine options"):
        VerifySettings(candidate=demo_model, reference=demo_model, engine="transformers", max_num_seqs=4)


def test_verify_cli_refuses_a_bad_layout_with_exit_2(demo_model):
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "verify", str(demo_model), str(demo_model), "--tensor-parallel-size", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "9 attention heads" in result.stderr and "Traceback" not in result.stderr


# vLLM's CUDA platform cannot be imported from the CPU build: its two attributes used here.
GPU = SimpleNamespace(device_name="cuda", ray_device_key="GPU", is_cpu=lambda: False)


def test_an_eager_pipeline_on_cpu_is_refused_before_it_kills_the_engine(demo_model):
    """vLLM's CPU backend, eager, pipeline 2: the second stage's input buffers are never set
    up and the first request kills the engine (seen here); compiled it works
    (test_parallel)."""
    from vllm.platforms.cpu import CpuPlatform

    with pytest.raises(EngineArgError, match="--enforce-eager false"):
        check_platform(2, True, "mp", CpuPlatform())
    check_platform(2, False, "mp", CpuPlatform())
    check_platform(2, True, "mp", GPU)  # GPUs warm up in eager mode too
    check_platform(1, True, "mp", CpuPlatform())
    with pytest.raises(ValidationError, match="engine dies on the first request"):
        ServeSettings(model=demo_model, pipeline_parallel_size=2, enforce_eager=True)
    from server.verify.settings import VerifySettings  # verify is eager by default

    with pytest.raises(ValidationError, match="--enforce-eager false"):
        VerifySettings(candidate=demo_model, reference=demo_model, pipeline_parallel_size=2)


def test_ray_on_the_cpu_backend_is_refused_with_vllms_reason(demo_model):
    """Ray 2.60 installs and starts here, and vLLM 0.32's CPU backend then fails with
    "current platform cpu does not support ray." (seen): refused before anything starts.
    The platform's own `ray_device_key` decides, so a GPU host passes."""
    from vllm.platforms.cpu import CpuPlatform

    with pytest.raises(EngineArgError, match="does not support ray"):
        check_platform(1, True, "ray", CpuPlatform())
    check_platform(1, True, "ray", GPU)
    with pytest.raises(ValidationError, match="use mp"):
        ServeSettings(model=demo_model, tensor_parallel_size=3, distributed_executor_backend="ray")
