"""Two trainings never share a GPU: fine-tuning on CUDA holds slots of Prefect's `gpu` global concurrency limit."""

import threading
import time
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_a_second_cuda_training_waits_for_the_first_to_free_the_gpu(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from tasks.finetune.stage import GPU_LIMIT, gpu_slots

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))
    spans = {}

    def train(name: str) -> None:
        with gpu_slots(SimpleNamespace(device="cuda", num_processes=1)):
            start = time.monotonic()
            time.sleep(1.5)
            spans[name] = (start, time.monotonic())

    first = threading.Thread(target=train, args=("first",))
    first.start()
    time.sleep(0.5)
    second = threading.Thread(target=train, args=("second",))
    second.start()
    first.join(60)
    second.join(60)
    assert spans["second"][0] >= spans["first"][1] - 0.05  # it started only once the first had finished
    # on the CPU nothing is held
    t = time.monotonic()
    with gpu_slots(SimpleNamespace(device="cpu", num_processes=1)):
        assert time.monotonic() - t < 0.1
