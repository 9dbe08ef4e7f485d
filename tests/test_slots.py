"""Every device slot comes back: after a copy that fails, after a Ctrl-C at
any bytecode of a forward pass, with two threads generating on one model,
and over a long run of all of these at once (the soak test). Also: a cache
that cannot start its copy workers leaves no thread behind."""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_models import build, expert_bytes, greedy, prompt

import moe_offload
from moe_offload import MoeOffloadError, StoreError, _core
from moe_offload import runtime as runtime_module
from moe_offload.adapters import find_expert_blocks
from moe_offload.adapters import modulelist as modulelist_module

NEW_TOKENS = 4


def os_threads() -> set[str]:
    """The process's OS thread ids: a thread left behind shows as a new id,
    while threads of earlier tests that end meanwhile do not count against it."""
    return set(os.listdir("/proc/self/task"))


def threads_end_within(baseline: set[str], seconds: float) -> set[str]:
    """The OS thread ids once every thread not in `baseline` has ended, or
    after `seconds`: a thread pool whose owner thread has just exited (torch's
    per-thread OpenMP team) takes a moment to wind down; a leaked thread
    stays. What remains is named by its thread name in a failure."""
    deadline = time.monotonic() + seconds
    while not os_threads() <= baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    now = os_threads()
    return {f"{tid} ({_thread_name(tid)})" if tid not in baseline else tid for tid in now}


def _thread_name(tid: str) -> str:
    try:
        return Path(f"/proc/self/task/{tid}/comm").read_text().strip()
    except OSError:
        return "gone"


def open_fds() -> Counter[str]:
    """What the process's open descriptors point at (files, sockets, pipes,
    each with its inode): one opened and left open shows as a new entry."""
    targets: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets[os.readlink(f"/proc/self/fd/{fd}")] += 1
        except FileNotFoundError:  # the descriptor listdir itself used
            pass
    return targets


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def slot_bytes(model: torch.nn.Module) -> int:
    return -(-max(b.expert_bytes for b in find_expert_blocks(model)) // 4096) * 4096


def patched(family: str, slots: int | None = None, **kwargs) -> tuple[torch.nn.Module, moe_offload.Offloader]:
    """A tiny `family` model patched on the CPU with `slots` device slots
    (default: the fewest one token needs, so every layer uses every slot)."""
    model = build(family)
    if slots is None:
        slots = max(b.top_k for b in find_expert_blocks(model))
    return model, moe_offload.patch(model, device="cpu", device_budget=slots * slot_bytes(model), **kwargs)


def tokens(model: torch.nn.Module, family: str, seed: int) -> torch.Tensor:
    return greedy(model, prompt(family, seed=seed), NEW_TOKENS)[0]


def every_slot_free(offloader: moe_offload.Offloader) -> bool:
    """No slot pinned and no expert's host bytes held for the CPU."""
    return offloader.stats()["free_slots"] == offloader.n_slots and offloader.cache.host_held == 0


# --- copy workers ------------------------------------------------------------


def test_copy_workers_out_of_range_are_refused_before_any_thread_starts():
    pool = torch.zeros(4096, dtype=torch.uint8)
    before = os_threads()
    for bad in (0, -1, 257, 2**40, 2**70, "4"):
        with pytest.raises(MoeOffloadError, match=r"copy_workers = .* is out of range: use 1 to 256"):
            _core.ExpertCache(
                layers=[(2, 100)],
                pool_address=pool.data_ptr(),
                pool_owner=pool,
                slot_bytes=4096,
                n_slots=1,
                copy_workers=bad,
            )
        assert os_threads() <= before, f"copy_workers={bad!r} left threads behind"


# --- a failed copy -----------------------------------------------------------


def test_a_failed_prefetch_frees_its_slot_and_every_generate_reports_the_store_error(tmp_path):
    """A warm EAMC makes the planner prefetch experts of the last MoE layer,
    whose blobs are all damaged: each failed prefetch must give its slot
    back (with two slots, one lost slot turned every later call into a
    BudgetError), and each generate must raise the real StoreError."""
    model = build("mixtral")
    model.save_pretrained(tmp_path / "checkpoint")
    store = tmp_path / "store"
    moe_offload.convert(tmp_path / "checkpoint", store)
    eamc = tmp_path / "eamc.bin"
    budgets = dict(device="cpu", host_budget=expert_bytes(model) // 2, device_budget=2 * slot_bytes(model))
    loaded, offloader = moe_offload.from_pretrained(store, eamc_path=eamc, **budgets)
    for seed in range(4):
        greedy(loaded, prompt("mixtral", seed=seed), NEW_TOKENS)
    moe_offload.unpatch(loaded)
    last = store / "layer-002.bin"
    stride = json.loads((store / "moe-store.json").read_text())["layers"][2]["stride"]
    data = bytearray(last.read_bytes())
    for expert in range(8):
        data[4096 + expert * stride + 100] ^= 0x01
    last.write_bytes(bytes(data))

    loaded, offloader = moe_offload.from_pretrained(store, eamc_path=eamc, **budgets)
    assert offloader.n_slots == 2
    for seed in range(6):
        with pytest.raises(StoreError, match=r"layer-002\.bin.*checksum mismatch"):
            greedy(loaded, prompt("mixtral", seed=seed), NEW_TOKENS)
        assert every_slot_free(offloader)
    assert offloader.stats()["prefetch_copies"] > 0, "the planner prefetched"


# --- an interrupt at any bytecode --------------------------------------------

# The code that takes and gives back slots: the gated forward (the core's
# pass gate itself is one call), the layers' fetch / wait / release, and the
# expert-container hooks.
_PROTOCOL = {
    runtime_module.PassGate.stream.__code__,
    runtime_module.LayerRuntime.experts.__code__,
    runtime_module.LayerRuntime.acquire.__code__,
    runtime_module.LayerRuntime.release.__code__,
    runtime_module.LayerRuntime._stream.__code__,
}
_HOOKS = {
    (modulelist_module.__file__, "hook"),
    (runtime_module.__file__, "gated"),
    (runtime_module.__file__, "run"),
}


class InterruptAt:
    """A tracer that raises KeyboardInterrupt at the `at`-th bytecode run in
    the slot protocol's code, as a Ctrl-C does between two bytecodes (at
    once, or never when `at` is None: it then only counts). A layer's
    experts are traced in MoE layer 0 only: later layers run the same code."""

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.seen = 0
        self.fired = False

    def __call__(self, frame, event, arg):
        code = frame.f_code
        traced = code in _PROTOCOL or (code.co_filename, code.co_name) in _HOOKS
        if code is runtime_module.LayerRuntime.experts.__code__ and frame.f_locals["self"].layer != 0:
            traced = False
        if not traced:
            return None
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return self.step

    def step(self, frame, event, arg):
        if event == "opcode":
            self.seen += 1
            if self.seen == self.at:
                self.fired = True
                raise KeyboardInterrupt
        return self.step

    def run(self, call):
        sys.settrace(self)
        try:
            return call()
        finally:
            sys.settrace(None)


@pytest.mark.parametrize(
    ("family", "cpu_experts"),
    [
        ("mixtral", "never"),
        ("mixtral", "always"),
        ("switch_transformers", "never"),
        ("switch_transformers", "always"),
    ],
)
def test_an_interrupt_at_any_bytecode_leaves_no_slot_held(family, cpu_experts):
    """Fused experts pin through a generator; expert containers through
    forward hooks that torch skips on KeyboardInterrupt; experts run on the
    CPU hold their host bytes. Interrupted at each bytecode of the protocol
    in turn, each pass must give back every slot and hold (a pin left behind
    made the next pass a BudgetError)."""
    model, offloader = patched(family, cpu_experts=cpu_experts)
    ids = prompt(family, length=1)["input_ids"]
    # The encoder alone is one gated pass of an encoder-decoder model.
    target = model.get_encoder() if family == "switch_transformers" else model

    def one_pass() -> None:
        with torch.no_grad():
            target(input_ids=ids)

    counter = InterruptAt(None)
    counter.run(one_pass)
    assert counter.seen > 100, "the protocol's code was traced"
    # A pass's path (and so its length) depends on where the core placed
    # each expert, which prefetches and background copies change from pass
    # to pass: an interrupt beyond a shorter pass's end does not fire.
    fired = 0
    for at in range(1, counter.seen + 1):
        interrupt = InterruptAt(at)
        try:
            interrupt.run(one_pass)
            raised = False
        except KeyboardInterrupt:
            raised = True
        assert raised == interrupt.fired, "the pass raises exactly the interrupt it was sent"
        fired += raised
        assert every_slot_free(offloader), f"slots held after an interrupt at bytecode {at}"
    assert fired >= 0.8 * counter.seen, f"only {fired} of {counter.seen} interrupts fired"
    reference = tokens(build(family), family, seed=1)
    assert torch.equal(tokens(model, family, seed=1), reference)
    assert every_slot_free(offloader)


# --- two threads -------------------------------------------------------------


def generate_in_threads(model, family: str, seeds: list[int], rounds: int) -> tuple[dict, list]:
    """Each seed's prompt generated `rounds` times on its own thread, all at once."""
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(seeds))

    def work(seed: int) -> None:
        try:
            start.wait()
            for r in range(rounds):
                results[(seed, r)] = tokens(model, family, seed)
        except BaseException as e:  # reported by the test, on its own thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


@pytest.mark.parametrize(("family", "slots"), [("mixtral", 2), ("qwen2_moe", 3), ("switch_transformers", 1)])
def test_two_threads_generating_on_one_model_get_the_tokens_of_one(family, slots):
    plain = build(family)
    expected = {seed: tokens(plain, family, seed) for seed in (0, 1)}
    model, offloader = patched(family, slots)
    results, errors = generate_in_threads(model, family, [0, 1], rounds=2)
    assert not errors, errors
    assert len(results) == 4
    for (seed, _), got in results.items():
        assert torch.equal(got, expected[seed]), f"thread of seed {seed} got other tokens"
    assert every_slot_free(offloader)


# --- soak ---------------------------------------------------------------------

SOAK_GENERATES = int(os.environ.get("MOE_OFFLOAD_SOAK_GENERATES", "24"))


@pytest.mark.soak
def test_soak_two_threads_and_interrupts_leave_slots_threads_fds_and_memory_as_they_were():
    """Two threads generate SOAK_GENERATES times in all on one patched model
    (two slots, prefetching policy); about a third of the generates are
    interrupted at a random bytecode of moe-offload's code. Every
    uninterrupted generate gives the single-threaded tokens, and afterwards
    every slot is free and threads, open files and memory are as before."""
    family = "mixtral"
    expected = {seed: tokens(build(family), family, seed) for seed in range(4)}
    model, offloader = patched(family)
    package = str(Path(moe_offload.__file__).parent)
    for seed in range(4):  # warm up: lazily started threads, allocator pools
        tokens(model, family, seed)
    baseline = (os_threads(), open_fds(), resident_bytes())
    wrong: list[str] = []
    counts = {"clean": 0, "interrupted": 0}

    class InterruptAnywhere(InterruptAt):
        def __call__(self, frame, event, arg):
            if not frame.f_code.co_filename.startswith(package):
                return None
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
            return self.step

    def work(worker: int) -> None:
        rng = random.Random(worker)
        for i in range(SOAK_GENERATES // 2):
            seed = (worker + i) % 4
            interrupt = InterruptAnywhere(rng.randrange(1, 3000) if rng.random() < 0.35 else None)
            try:
                got = interrupt.run(lambda: tokens(model, family, seed))  # noqa: B023
            except KeyboardInterrupt:
                counts["interrupted"] += 1
                continue
            except BaseException as e:
                wrong.append(f"worker {worker}, generate {i}: {type(e).__name__}: {e}")
                continue
            counts["clean"] += 1
            if not torch.equal(got, expected[seed]):
                wrong.append(f"worker {worker}, generate {i}: other tokens")

    workers = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert not wrong, wrong
    assert counts["interrupted"] > 0 and counts["clean"] > 0, counts
    assert torch.equal(tokens(model, family, 0), expected[0])
    assert every_slot_free(offloader)
    threads, fds, memory = baseline
    assert threads_end_within(threads, seconds=10) <= threads, "threads left behind"
    assert not open_fds() - fds, "descriptors left open"
    assert resident_bytes() - memory < 16 << 20, "memory grew"
