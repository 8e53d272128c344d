"""Settings fail at build time, naming the field; a model that cannot be fetched names the offline way."""

import pytest

from serve_tp.api.admission import serve_routing_limit
from serve_tp.api.app import ConfigError, api_deployment_options, build_app, deployment_options
from serve_tp.config import ServeTPConfig, resolve_dtype
from serve_tp.model.source import ModelSourceError, check_model_shardable, resolve_model_dir


@pytest.mark.parametrize(
    "args, field",
    [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"tensor_parallel_size": "two"}, "tensor_parallel_size"),
        ({"device": "tpu"}, "device"),
        ({"placement_strategy": "ANYWHERE"}, "placement_strategy"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"max_prefill_tokens": 0}, "max_prefill_tokens"),
        ({"no_such_setting": 1}, "no_such_setting"),
        ({"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling_config"),
        ({"device": "cpu", "dtype": "float16"}, "float16"),
        ({"device": "cpu", "decode_attention": "triton"}, "decode_attention"),
        ({"decode_attention": "flash"}, "decode_attention"),
        ({"api_replicas": 0}, "api_replicas"),
        ({"api_replicas": 2, "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}, "api_replicas"),
        ({"api_replicas": 2, "num_replicas": 2}, "api_replicas"),
    ],
)
def test_bad_settings_fail_at_build_time_naming_the_field(args, field):
    with pytest.raises(ConfigError, match=field):
        build_app(args)


def test_cli_strings_are_coerced_like_serve_run_passes_them():
    cfg = ServeTPConfig.model_validate({"tensor_parallel_size": "3", "max_batch_size": "8", "device": "cpu"})
    assert (cfg.tensor_parallel_size, cfg.max_batch_size) == (3, 8)


def test_autoscaling_replaces_num_replicas():
    cfg = ServeTPConfig(autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
    options = deployment_options(cfg, "cuda")
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert "num_replicas" not in options
    assert deployment_options(ServeTPConfig(num_replicas=3), "cuda")["num_replicas"] == 3


def test_api_replicas_split_the_groups_limits_and_leave_the_group_deployment_its_placement():
    cfg = ServeTPConfig(api_replicas=3, max_ongoing_requests=64, max_queued_requests=100)
    assert cfg.api_replica_limits() == (22, 34)  # rounded up: the group admits at least its limits
    api = api_deployment_options(cfg)
    assert api["num_replicas"] == 3 and api["ray_actor_options"] == {"num_cpus": 1.0}
    assert api["max_ongoing_requests"] == serve_routing_limit(22, 34) and api["max_queued_requests"] == 34
    assert "placement_group_bundles" not in api
    group = deployment_options(cfg, "cuda")
    assert group["num_replicas"] == 1 and len(group["placement_group_bundles"]) == 1 + cfg.tensor_parallel_size
    assert "backpressure_config" not in group  # no client request reaches it
    one = ServeTPConfig(max_ongoing_requests=64, max_queued_requests=-1)
    assert one.api_replica_limits() == (64, -1)
    assert deployment_options(one, "cuda")["max_ongoing_requests"] == 64  # api_replicas 1: as before


def test_dtype_defaults_follow_the_device():
    cfg = ServeTPConfig()
    assert (cfg.resolved_dtype("cuda"), cfg.resolved_dtype("cpu")) == ("float16", "float32")


def test_one_dtype_rule_for_config_and_resolution():
    """float16 on cpu is refused by the same rule whether the device is named or resolved."""
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16" and resolve_dtype("float16", "cuda") == "float16"
    with pytest.raises(ValueError, match="float16 is not supported with device cpu"):
        ServeTPConfig(dtype="float16").resolved_dtype("cpu")
    with pytest.raises(ValueError, match="float16 is not supported with device cpu"):
        ServeTPConfig(device="cpu", dtype="float16")


def test_triton_decode_attention_needs_cuda_named_or_resolved():
    """Refused, not quietly swapped for sdpa, whether cpu is named or 'auto' resolves to it."""
    assert ServeTPConfig(device="cuda", decode_attention="triton").resolved_dtype("cuda") == "float16"
    with pytest.raises(ValueError, match="decode_attention triton needs device cuda"):
        ServeTPConfig(decode_attention="triton").resolved_dtype("cpu")
    with pytest.raises(ValueError, match="decode_attention triton needs device cuda"):
        ServeTPConfig(device="cpu", decode_attention="triton")


def test_fused_decode_needs_cuda_named_or_resolved():
    assert ServeTPConfig(device="cuda", fused_decode=True).resolved_dtype("cuda") == "float16"
    with pytest.raises(ValueError, match="fused_decode needs device cuda"):
        ServeTPConfig(fused_decode=True).resolved_dtype("cpu")
    with pytest.raises(ValueError, match="fused_decode needs device cuda"):
        ServeTPConfig(device="cpu", fused_decode=True)


def test_unreachable_hub_model_names_the_offline_option(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(ModelSourceError) as failure:
        resolve_model_dir("gpt2")
    message = str(failure.value)
    assert "'gpt2'" in message and "python -m serve_tp.model.tiny_model" in message


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "absent"))


def test_non_gpt2_models_are_refused_with_their_type():
    with pytest.raises(ModelSourceError, match="'llama'"):
        check_model_shardable({"model_type": "llama"}, 2)


def test_async_scheduling_defaults_on_with_cuda_only_and_a_setting_wins():
    default = ServeTPConfig()
    assert (default.resolved_async_scheduling("cuda"), default.resolved_async_scheduling("cpu")) == (True, False)
    assert ServeTPConfig(async_scheduling=False).resolved_async_scheduling("cuda") is False
    assert ServeTPConfig(async_scheduling=True).resolved_async_scheduling("cpu") is True
