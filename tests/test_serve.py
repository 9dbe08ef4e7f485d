"""`moe-offload serve` as a real process on a tiny random Mixtral with a local
word-level tokenizer, driven over HTTP with the official `openai` client
(and httpx for what the client hides: raw bodies, headers, disconnects)."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tiny_models
import torch

import moe_offload
from moe_offload._core import ActivationCollection

pytest.importorskip("fastapi", reason="needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="needs the serve extra (fastapi, uvicorn)")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "tiny"
API_KEY = "test-key"
CONTEXT = 16384  # the model's; longer than the KV cache, so both limits can be hit apart
KV_CACHE_TOKENS = 8192
MAX_QUEUE = 16
START_TIMEOUT_S = 90
SHUTDOWN_GRACE_S = 60


@dataclass
class Served:
    url: str
    process: subprocess.Popen
    eamc: Path
    log: Path
    model: torch.nn.Module
    tokenizer: object
    # (prompt ids, max_tokens) of the concurrent requests, whose activation
    # matrices the EAMC saved at shutdown must hold.
    traced: list[tuple[list[int], int]] = field(default_factory=list)

    def client(self, key: str | None = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=60)

    def post(
        self, path: str, body: object, key: str | None = API_KEY, raw: bytes | None = None
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        content = raw if raw is not None else json.dumps(body).encode()
        return httpx.post(f"{self.url}{path}", content=content, headers=headers, timeout=60)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        pattern = r"^(moe_offload_\w+(?:\{[^}]*\})?) (\S+)$"
        return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.M)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serving(root: Path, family: str, options: Sequence[str] = ()) -> Iterator[Served]:
    """`moe-offload serve` on a tiny random `family` model, as a real
    process, with the command-line `options` added."""
    checkpoint = root / f"tiny-{family}"
    model = tiny_models.build(family)
    model.config.max_position_embeddings = CONTEXT
    tokenizer = tiny_models.word_tokenizer()
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    port, eamc, log = _free_port(), root / "eamc.bin", root / "server.log"
    command = [sys.executable, "-m", "moe_offload.cli", "serve", str(checkpoint), "--device", "cpu"]
    command += ["--port", str(port), "--served-model-name", MODEL, "--eamc-path", str(eamc)]
    command += ["--max-queue", str(MAX_QUEUE), "--kv-cache-tokens", str(KV_CACHE_TOKENS)]
    # Generous: on a loaded 2-core machine a token of even this model can take 0.1 s.
    command += ["--shutdown-grace", str(SHUTDOWN_GRACE_S), *options]
    # The key through the environment, as a deployment would pass it.
    env = dict(os.environ, MOE_OFFLOAD_API_KEY=API_KEY)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    served = Served(f"http://127.0.0.1:{port}", process, eamc, log, model, tokenizer)
    try:
        _wait_healthy(served)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with _serving(tmp_path_factory.mktemp("serve"), "mixtral") as served:
        yield served


def _wait_healthy(served: Served) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            pytest.fail(f"the server exited with {served.process.returncode}:\n{served.log.read_text()}")
        try:
            if httpx.get(f"{served.url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the server did not answer /health within {START_TIMEOUT_S} s:\n{served.log.read_text()}")


def _expected(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """What plain greedy `generate` gives `prompt` alone (stopping at EOS, as the server)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def _complete(served: Served, job: dict) -> dict:
    """Runs one request of the mixed workload with the openai client; returns
    its token ids, text, usage and finish reason however it was served."""
    client = served.client()
    common = dict(
        model=MODEL, max_tokens=job["max_tokens"], temperature=0, extra_body={"return_token_ids": True}
    )
    if job["chat"]:
        call = client.chat.completions.create
        args = dict(common, messages=job["messages"])
    else:
        call = client.completions.create
        args = dict(common, prompt=job["prompt"])
    if not job["stream"]:
        response = call(**args)
        choice = response.choices[0]
        text = choice.message.content if job["chat"] else choice.text
        return dict(tokens=choice.token_ids, text=text, usage=response.usage, finish=choice.finish_reason)
    tokens, text, usage, finish, chunks = [], [], None, None, 0
    for chunk in call(**args, stream=True):
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        chunks += 1
        tokens += choice.token_ids
        text.append((choice.delta.content or "") if job["chat"] else choice.text)
        finish = choice.finish_reason or finish
    assert chunks == len(tokens), "one chunk per token"
    return dict(tokens=tokens, text="".join(text), usage=usage, finish=finish)


def _jobs(tokenizer: object) -> list[dict]:
    jobs = []
    words = [w for w in tokenizer.get_vocab() if not w.startswith("<")]
    for i in range(16):
        length, max_tokens = 3 + i, 8 + i % 5
        chat, stream = i % 4 >= 2, i % 2 == 1
        job = dict(chat=chat, stream=stream, max_tokens=max_tokens)
        if chat:
            job["messages"] = [
                {"role": "user", "content": " ".join(words[(i + k) % len(words)] for k in range(length))}
            ]
            job["ids"] = list(
                tokenizer.apply_chat_template(job["messages"], add_generation_prompt=True, return_dict=False)
            )
        elif i % 8 == 0:  # a text prompt
            job["prompt"] = " ".join(words[(3 * i + k) % len(words)] for k in range(length))
            job["ids"] = tokenizer.encode(job["prompt"])
        else:  # token ids
            job["prompt"] = [(7 * i + 5 * k) % 90 + 4 for k in range(length)]
            job["ids"] = job["prompt"]
        jobs.append(job)
    return jobs


def test_lists_the_model(served: Served) -> None:
    assert [m.id for m in served.client().models.list().data] == [MODEL]


def test_concurrent_requests_get_what_the_model_gives_each_alone(served: Served) -> None:
    jobs = _jobs(served.tokenizer)
    eamc_before = served.metrics()["moe_offload_eamc_requests"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: _complete(served, job), jobs))
    for job, got in zip(jobs, results, strict=True):
        want = _expected(served.model, job["ids"], job["max_tokens"])
        assert got["tokens"] == want, job
        assert got["text"] == served.tokenizer.decode(want, skip_special_tokens=True)
        assert got["finish"] == ("stop" if want[-1] == 2 else "length")
        usage = got["usage"]
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(job["ids"]), len(want))
        assert usage.total_tokens == len(job["ids"]) + len(want)
    metrics = served.metrics()
    assert metrics["moe_offload_requests_running"] == 0
    assert not any(name.startswith("moe_offload_lookahead") for name in metrics), "lookahead is off"
    # Each request traced on its own, though batched (see the SIGTERM test).
    assert metrics["moe_offload_eamc_requests"] == eamc_before + len(jobs)
    served.traced = [(job["ids"], job["max_tokens"]) for job in jobs]


def test_deepseek_latent_attention_is_served_batched_as_alone(tmp_path: Path) -> None:
    """DeepSeek-V2 caches latents, not keys and values, in the batching
    engine's paged cache: concurrent requests still get their own tokens
    (with router lookahead on, which runs beside the packed passes)."""
    with _serving(tmp_path, "deepseek_v2", ["--lookahead", "1"]) as served:
        jobs = [job for job in _jobs(served.tokenizer) if not job["chat"]][:6]
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: _complete(served, job), jobs))
        for job, got in zip(jobs, results, strict=True):
            assert got["tokens"] == _expected(served.model, job["ids"], job["max_tokens"]), job
        # The lookahead reached the core and was scored one layer ahead.
        precision = served.metrics()['moe_offload_lookahead_precision{distance="1"}']
        assert 0.0 <= precision <= 1.0


def _sampled(served: Served, seed: int | None, temperature: float = 1.5) -> list[int]:
    response = served.client().completions.create(
        model=MODEL,
        prompt=[5, 9, 14, 20],
        max_tokens=12,
        temperature=temperature,
        seed=seed,
        extra_body={"return_token_ids": True},
    )
    return response.choices[0].token_ids


def test_a_seed_gives_the_same_tokens_alone_and_in_a_batch(served: Served) -> None:
    alone = _sampled(served, 7)
    with ThreadPoolExecutor(4) as pool:
        batch = list(pool.map(lambda s: _sampled(served, s, 1.5 if s else 0), [11, 7, None, 8]))
    assert batch[1] == alone
    assert batch[0] != alone and batch[3] != alone  # other seeds, other draws
    assert batch[2] == _expected(served.model, [5, 9, 14, 20], 12)  # greedy beside them


def test_stop_string_ends_the_completion_before_it(served: Served) -> None:
    body = dict(model=MODEL, prompt=[5, 9, 14, 20], max_tokens=12, temperature=0)
    full = served.post("/v1/completions", body).json()["choices"][0]["text"]
    words = full.split(" ")
    # The first word after the first that does not occur in the text before it.
    at = next(i for i in range(1, len(words)) if words[i] not in " ".join(words[:i]))
    stopped = served.post("/v1/completions", dict(body, stop=["zzz", words[at]])).json()
    assert stopped["choices"][0]["text"] == " ".join(words[:at]) + " "
    assert stopped["choices"][0]["finish_reason"] == "stop"


def _error(response: httpx.Response, status: int, kind: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_bad_requests_get_400_and_the_server_carries_on(served: Served) -> None:
    good = dict(model=MODEL, prompt=[5, 9, 14, 20], max_tokens=6, temperature=0)
    bad = "invalid_request_error"
    _error(served.post("/v1/completions", None, raw=b'{"model": "tiny", "prompt": [1,'), 400, bad)
    _error(served.post("/v1/completions", [1, 2]), 400, bad)
    _error(served.post("/v1/completions", dict(good, max_tokens="6")), 400, bad, "max_tokens")
    _error(served.post("/v1/completions", dict(good, temperature="hot")), 400, bad, "temperature")
    _error(served.post("/v1/completions", dict(good, model="gpt-4")), 400, bad, "model")
    _error(served.post("/v1/completions", dict(good, max_tokens=0)), 400, bad, "max_tokens")
    _error(served.post("/v1/completions", dict(good, n=2)), 400, bad, "n")
    _error(served.post("/v1/chat/completions", dict(good, messages=[])), 400, bad, "messages")
    error = _error(served.post("/v1/completions", dict(good, max_tokens=CONTEXT)), 400, bad, "max_tokens")
    assert "context" in error["message"] and error["code"] == "context_length_exceeded"
    error = _error(served.post("/v1/completions", dict(good, max_tokens=KV_CACHE_TOKENS)), 400, bad)
    assert "KV cache" in error["message"]
    _error(served.post("/v1/completions", dict(good, prompt=[5, 999])), 400, bad, "prompt")
    with pytest.raises(openai.BadRequestError):
        served.client().completions.create(model=MODEL, prompt="the fox", max_tokens=-1)
    response = served.post("/v1/completions", good)
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == served.tokenizer.decode(
        _expected(served.model, good["prompt"], 6), skip_special_tokens=True
    )


def test_missing_or_wrong_api_key_gets_401(served: Served) -> None:
    body = dict(model=MODEL, prompt=[5, 9], max_tokens=2)
    _error(served.post("/v1/completions", body, key=None), 401, "authentication_error")
    _error(served.post("/v1/completions", body, key="wrong"), 401, "authentication_error")
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").models.list()
    assert httpx.get(f"{served.url}/health", timeout=5).status_code == 200  # probes need no key


def _open_stream(stack: ExitStack, served: Served, max_tokens: int) -> httpx.Response:
    body = dict(model=MODEL, prompt=[5, 9, 14], max_tokens=max_tokens, temperature=0, stream=True)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    client = stack.enter_context(httpx.Client(timeout=30))
    response = stack.enter_context(
        client.stream("POST", f"{served.url}/v1/completions", json=body, headers=headers)
    )
    assert response.status_code == 200
    return response


def _wait_idle(served: Served, timeout: float = 20) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = served.metrics()
        if metrics["moe_offload_requests_running"] == 0 and metrics["moe_offload_requests_queued"] == 0:
            return metrics
        time.sleep(0.1)
    pytest.fail("the server still runs requests")


def test_a_full_queue_gets_429_with_retry_after(served: Served) -> None:
    before = served.metrics()
    with ExitStack() as stack:
        for _ in range(MAX_QUEUE):
            _open_stream(stack, served, max_tokens=400)
        response = served.post("/v1/completions", dict(model=MODEL, prompt=[5], max_tokens=2))
        _error(response, 429, "rate_limit_error")
        assert int(response.headers["retry-after"]) >= 1
    # The streams' clients left: their requests were cancelled, not finished.
    after = _wait_idle(served)
    assert after["moe_offload_requests_cancelled_total"] - before["moe_offload_requests_cancelled_total"] > 0
    assert served.post("/v1/completions", dict(model=MODEL, prompt=[5], max_tokens=2)).status_code == 200


def test_a_client_that_disconnects_cancels_its_request(served: Served) -> None:
    max_tokens = 3000
    before = served.metrics()
    with ExitStack() as stack:
        response = _open_stream(stack, served, max_tokens)
        lines = response.iter_lines()
        received = 0
        while received < 3:
            received += next(lines).startswith("data: ")
    after = _wait_idle(served)
    assert after["moe_offload_requests_cancelled_total"] == before["moe_offload_requests_cancelled_total"] + 1
    generated = after["moe_offload_generation_tokens_total"] - before["moe_offload_generation_tokens_total"]
    assert 3 <= generated < max_tokens
    time.sleep(0.5)  # and nothing goes on generating for it
    assert (
        served.metrics()["moe_offload_generation_tokens_total"]
        == after["moe_offload_generation_tokens_total"]
    )


def test_sigterm_finishes_running_requests_saves_the_eamc_and_exits_0(served: Served) -> None:
    """Last: it stops the module's server."""
    result: dict = {}

    def run() -> None:
        result.update(_complete(served, dict(chat=False, stream=True, max_tokens=30, prompt=[5, 9, 14])))

    client = threading.Thread(target=run)
    client.start()
    deadline = time.monotonic() + 10
    while served.metrics()["moe_offload_requests_running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=SHUTDOWN_GRACE_S + 30) == 0, served.log.read_text()
    client.join(timeout=10)
    assert result["tokens"] == _expected(served.model, [5, 9, 14], 30)  # finished within the grace period
    assert served.eamc.is_file() and served.eamc.stat().st_size > 0, served.log.read_text()
    assert served.traced, "the concurrent requests' test runs first"
    saved = ActivationCollection.load(served.eamc)
    entries = [tuple(saved.entry(i)) for i in range(len(saved))]
    for matrix in _activations_alone(served.model, served.traced):
        assert matrix in entries, "a request's activation matrix served alone is not in the EAMC"
        entries.remove(matrix)


def _activations_alone(model: torch.nn.Module, requests: list[tuple[list[int], int]]) -> list[tuple]:
    """The expert activation matrix of each request served alone by plain
    greedy `generate` on a patched copy of `model`."""
    plain = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as tmp:
        offloader = moe_offload.patch(plain, device="cpu", eamc_path=Path(tmp) / "alone.bin")
        for prompt, max_tokens in requests:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                plain.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
        path = offloader.save_eamc()
        moe_offload.unpatch(plain)
        alone = ActivationCollection.load(path)
        return [tuple(alone.entry(i)) for i in range(len(alone))]


def test_incremental_text_equals_the_whole_decode_for_byte_level_tokens() -> None:
    """Token by token, characters split over tokens (é, emoji) come out whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moe_offload.serve.stream import Detokenizer

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        ["café au lait", "hello world"],
        trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    text = "un café 🙂 au lait, world"
    ids = tokenizer.encode(text)
    detokenizer = Detokenizer(tokenizer)
    pieces = [detokenizer.add([i]) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_an_encoder_decoder_model_is_refused_before_the_port_opens(tmp_path: Path) -> None:
    checkpoint = tmp_path / "tiny-switch"
    tiny_models.build("switch_transformers").save_pretrained(checkpoint)
    tiny_models.word_tokenizer().save_pretrained(checkpoint)
    command = [sys.executable, "-m", "moe_offload.cli", "serve", str(checkpoint), "--device", "cpu"]
    command += ["--port", str(_free_port())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    assert done.returncode != 0
    assert "switch_transformers is an encoder-decoder model" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_a_model_the_batching_engine_cannot_run_is_refused_with_the_reason() -> None:
    """The one-token check at start: a model whose forward fails in the
    batching engine is refused with the failure, and the generation thread
    is stopped."""
    from moe_offload.serve.engine import Engine, EngineConfig

    model = tiny_models.build("mixtral")

    def broken_attention(*args: object, **kwargs: object) -> None:
        raise RuntimeError("this attention cannot run here")

    model.model.layers[1].self_attn.forward = broken_attention
    engine = Engine(model, None, tiny_models.word_tokenizer(), EngineConfig(kv_cache_tokens=512))
    with pytest.raises(moe_offload.MoeOffloadError, match="mixtral cannot be served yet: .*cannot run here"):
        engine.launch()
    assert not engine.manager.is_running()
