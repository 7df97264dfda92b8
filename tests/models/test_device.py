"""Which GPU a process trains on: under torchrun with several processes ``cuda`` / ``auto`` is the process's own
``cuda:LOCAL_RANK``, and one fixed ``cuda:N`` for every process is one error line. A faked environment (the
variables torchrun sets, CUDA reported present with 4 devices) stands in for a GPU host."""

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.models.load import resolve_device
from tunesmith.train.dist import SharedError


@pytest.fixture()
def gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)

    def launch(rank: int, local_rank: int, world_size: int):
        for key, value in {"RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": world_size,
                           "TORCHELASTIC_RUN_ID": "test"}.items():
            monkeypatch.setenv(key, str(value))

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    return launch


@pytest.mark.parametrize("asked", ["cuda", "auto"])
def test_each_process_takes_its_local_rank(gpus, asked):
    gpus(rank=5, local_rank=1, world_size=8)  # second host of two, its second process
    assert resolve_device(asked) == torch.device("cuda", 1)
    gpus(rank=3, local_rank=3, world_size=4)
    assert resolve_device(asked) == torch.device("cuda", 3)


def test_one_process_keeps_what_it_asked_for(gpus):
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:2") == torch.device("cuda", 2)
    gpus(rank=0, local_rank=0, world_size=1)  # torchrun with one process
    assert resolve_device("cuda:2") == torch.device("cuda", 2)


def test_a_fixed_gpu_for_several_processes_is_one_error_line(gpus):
    gpus(rank=1, local_rank=1, world_size=2)
    with pytest.raises(SharedError) as caught:
        resolve_device("cuda:0")
    assert str(caught.value) == ("model.device=cuda:0 with 2 processes would put every process on that one GPU; "
                                 "use model.device=cuda (each process takes cuda:LOCAL_RANK)")


def test_cpu_processes_stay_on_the_cpu(gpus, monkeypatch):
    gpus(rank=1, local_rank=1, world_size=2)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(TunesmithError, match="CUDA is not available"):
        resolve_device("cuda")
