"""resolve_device: one rule for every --device, and clear errors for devices this machine does not have."""

from __future__ import annotations

import pytest
import torch

from chexfound.errors import ConfigError, DeviceError
from chexfound.runio import DistInfo, init_distributed, resolve_device
from chexfound.ssl import distributed as ssl_distributed


@pytest.mark.parametrize("spec", [None, "", "auto"])
def test_auto_is_cuda_when_available_else_cpu(spec):
    assert resolve_device(spec) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_cpu_spellings_and_device_objects():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" cpu ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cpu:zero", "best"])
def test_a_name_that_is_no_device(spec):
    with pytest.raises(DeviceError, match="not a device name; use auto, cpu, cuda"):
        resolve_device(spec)


def test_an_unsupported_device_type():
    with pytest.raises(DeviceError, match="unsupported device type 'meta'"):
        resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_cuda_without_cuda_is_a_clear_error(spec):
    with pytest.raises(DeviceError, match="CUDA is not available here") as e:
        resolve_device(spec)
    assert isinstance(e.value, ConfigError)  # the CLI reports it like any bad option (exit 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_index_past_the_visible_gpus():
    n = torch.cuda.device_count()
    assert resolve_device(f"cuda:{n - 1}") == torch.device("cuda", n - 1)
    with pytest.raises(DeviceError, match=f"only {n} CUDA device"):
        resolve_device(f"cuda:{n}")


def test_init_distributed_without_torchrun_is_one_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert info.is_main and not info.enabled
    assert DistInfo().device == torch.device("cpu")
    with pytest.raises(DeviceError):
        init_distributed("gpu")


def test_the_ssl_names_still_work():
    # the pretraining loop imports these from chexfound.ssl.distributed
    assert ssl_distributed.init_distributed is init_distributed
    assert ssl_distributed.resolve_device is resolve_device
    t = torch.ones(2)
    assert ssl_distributed.all_reduce_sum(t) is t and ssl_distributed.world_size() == 1
    assert ssl_distributed.rank() == 0 and ssl_distributed.broadcast_object({"a": 1}) == {"a": 1}
