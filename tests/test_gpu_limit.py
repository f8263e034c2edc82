"""Two trainings never share a GPU: fine-tuning on CUDA holds slots of Prefect's `gpu` global concurrency limit."""

import threading
from types import SimpleNamespace

import pytest

CUDA = SimpleNamespace(device="cuda", num_processes=1, cluster=None)
CPU = SimpleNamespace(device="cpu", num_processes=1, cluster=None)


@pytest.fixture()
def gpu_limit(prefect_server):
    """The `gpu` limit with one slot on the shared server, removed afterwards; a client for it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from tasks.finetune.stage import GPU_LIMIT

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))
        try:
            yield client
        finally:
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)


@pytest.fixture()
def slot_requests(monkeypatch):
    """Each request this process makes for concurrency slots, as the server answered it: "granted", or "refused"
    (423 Locked, after which Prefect's client waits and asks again); `refused` is set at the first refusal."""
    import httpx
    from prefect.client.orchestration import PrefectClient

    answers, refused = [], threading.Event()
    ask = PrefectClient.increment_concurrency_slots_with_lease

    async def spy(self, *args, **kwargs):
        try:
            response = await ask(self, *args, **kwargs)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:
                answers.append("refused")
                refused.set()
            raise
        answers.append("granted")
        return response

    monkeypatch.setattr(PrefectClient, "increment_concurrency_slots_with_lease", spy)
    return SimpleNamespace(answers=answers, refused=refused)


def _training(env, holds: threading.Event, release: threading.Event) -> threading.Thread:
    """A thread that takes the GPU slots `env` needs, sets `holds`, and gives them back once `release` is set."""
    from tasks.finetune.stage import gpu_slots

    def train():
        with gpu_slots(env):
            holds.set()
            release.wait(120)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    return thread


def test_a_second_cuda_training_waits_for_the_first_to_free_the_gpu(gpu_limit, slot_requests):
    from tasks.finetune.stage import GPU_LIMIT, gpu_slots

    first_holds, second_holds, release_first, release_second = (threading.Event() for _ in range(4))
    first = _training(CUDA, first_holds, release_first)
    assert first_holds.wait(180), "the first training never got the GPU"
    assert gpu_limit.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots == 1

    second = _training(CUDA, second_holds, release_second)
    assert slot_requests.refused.wait(180), "the second training was never refused a slot"
    assert not second_holds.is_set()  # the first still holds the only slot
    release_first.set()
    first.join(60)
    assert second_holds.wait(180), "the second training did not start once the first had finished"
    release_second.set()
    second.join(60)
    assert slot_requests.answers[0] == slot_requests.answers[-1] == "granted"
    assert set(slot_requests.answers[1:-1]) == {"refused"}

    # on the CPU nothing is held: no slot is asked for
    asked = len(slot_requests.answers)
    with gpu_slots(CPU):
        assert gpu_limit.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots == 0
    assert len(slot_requests.answers) == asked
