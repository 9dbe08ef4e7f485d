"""`moe-offload serve --replicas`: the server as two Ray Serve replicas on
the CPU of a local Ray instance, driven through Ray Serve's HTTP proxy with
the official `openai` client, on the tiny Mixtral and local tokenizer of
test_serve.py."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import tiny_models
import torch

ray = pytest.importorskip("ray", reason='needs Ray Serve: pip install "moe-offload[ray]"')
serve = pytest.importorskip("ray.serve", reason='needs Ray Serve: pip install "moe-offload[ray]"')
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import test_serve  # noqa: E402  (its helpers need the serve extra, checked above it)

from moe_offload._core import MoeOffloadError  # noqa: E402
from moe_offload.serve import replicas  # noqa: E402

MODEL = "tiny"
API_KEY = "ray-key"
REPLICAS = 2
MAX_REQUESTS = 48  # Ray Serve picks the replica; both answer long before this many


@dataclass
class Deployed:
    url: str
    eamc: Path
    model: torch.nn.Module
    tokenizer: object

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    root = tmp_path_factory.mktemp("serve-ray")
    checkpoint = root / "tiny-mixtral"
    model = tiny_models.build("mixtral")
    tokenizer = tiny_models.word_tokenizer()
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    port, eamc = test_serve._free_port(), root / "eamc.bin"
    # A Ray of its own (never a cluster RAY_ADDRESS names), two CPUs: one per replica.
    ray.init(address="local", num_cpus=REPLICAS, include_dashboard=False, logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        application = replicas.deployment(
            checkpoint,
            replicas=REPLICAS,
            device="cpu",
            eamc_path=eamc,
            served_model_name=MODEL,
            api_key=API_KEY,
            kv_cache_tokens=1024,
        )
        serve.run(application, name=replicas.APP_NAME, route_prefix="/")
        yield Deployed(f"http://127.0.0.1:{port}", eamc, model, tokenizer)
    finally:
        serve.shutdown()
        ray.shutdown()


def _complete(deployed: Deployed, prompt: list[int], max_tokens: int) -> tuple[str, list[int]]:
    """(the replica that answered, the greedy tokens) of one completion."""
    raw = deployed.client().completions.with_raw_response.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    return raw.headers[replicas.REPLICA_HEADER], raw.parse().choices[0].token_ids


def _eamc_sizes(deployed: Deployed) -> dict[str, float]:
    """Each replica's EAMC entries, from /metrics of whichever replica answers."""
    sizes: dict[str, float] = {}
    for _ in range(MAX_REQUESTS):
        response = httpx.get(f"{deployed.url}/metrics", timeout=10)
        found = re.search(r"^moe_offload_eamc_requests (\S+)$", response.text, re.M)
        assert found, response.text
        sizes[response.headers[replicas.REPLICA_HEADER]] = float(found[1])
        if len(sizes) == REPLICAS:
            break
    return sizes


def test_both_replicas_answer_with_what_the_model_gives(deployed: Deployed) -> None:
    answered: Counter[str] = Counter()
    with ThreadPoolExecutor(4) as pool:
        while len(answered) < REPLICAS and answered.total() < MAX_REQUESTS:
            sent = answered.total()
            prompts = [
                [(5 * (sent + i) + 3 * k) % 90 + 4 for k in range(3 + (sent + i) % 7)] for i in range(4)
            ]
            answers = list(pool.map(lambda p: _complete(deployed, p, 6), prompts))
            for prompt, (replica, tokens) in zip(prompts, answers, strict=True):
                assert tokens == test_serve._expected(deployed.model, prompt, 6), (replica, prompt)
                answered[replica] += 1
    assert set(answered) == {str(i) for i in range(REPLICAS)}, f"replicas that answered: {answered}"
    # Each replica's requests joined its own EAMC.
    assert _eamc_sizes(deployed) == {replica: float(n) for replica, n in answered.items()}


def test_the_proxy_serves_every_route(deployed: Deployed) -> None:
    client = deployed.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    messages = [{"role": "user", "content": "the quick brown fox"}]
    ids = list(
        deployed.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    )
    tokens = []
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=5,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True},
    ):
        if chunk.choices:
            tokens += chunk.choices[0].token_ids
    assert tokens == test_serve._expected(deployed.model, ids, 5)
    assert httpx.get(f"{deployed.url}/health", timeout=10).json() == {"status": "ok"}
    assert "moe_offload_requests_total" in httpx.get(f"{deployed.url}/metrics", timeout=10).text
    unauthorized = httpx.post(
        f"{deployed.url}/v1/completions", json={"model": MODEL, "prompt": "a"}, timeout=10
    )
    assert unauthorized.status_code == 401, unauthorized.text
    assert unauthorized.json()["error"]["code"] == "invalid_api_key"


def test_each_replica_saves_its_own_eamc_at_shutdown(deployed: Deployed) -> None:
    # The other tests ran requests through both replicas; deleting the
    # application shuts each down gracefully.
    for replica in range(REPLICAS):
        assert not Path(replicas.replica_eamc_path(str(deployed.eamc), str(replica))).exists()
    serve.delete(replicas.APP_NAME)
    deadline = time.monotonic() + 30
    paths = [Path(replicas.replica_eamc_path(str(deployed.eamc), str(i))) for i in range(REPLICAS)]
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(p.exists() for p in paths), [p.name for p in paths if not p.exists()]
    assert not deployed.eamc.exists(), "replicas write their own files, never the shared name"


def test_options_are_checked_before_ray_starts() -> None:
    with pytest.raises(MoeOffloadError, match="use --device cuda"):
        replicas.deployment("unused", replicas=2, device="cuda:1")
    with pytest.raises(MoeOffloadError, match="--replicas 0 must be at least 1"):
        replicas.deployment("unused", replicas=0)
    with pytest.raises(MoeOffloadError, match="bad options"):
        replicas.deployment("unused", no_such_option=1)
