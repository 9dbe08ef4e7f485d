"""Models larger than host memory: `from_pretrained` on checkpoints written by
`save_pretrained`, the expert store `convert` writes, and every way a file on
disk can be missing, damaged or not match the model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from tiny_models import build, expert_bytes, greedy, prompt

import moe_offload
from moe_offload import BudgetError, MoeOffloadError, StoreError

NEW_TOKENS = 12
FAMILIES = ["mixtral", "deepseek_v2"]


def generate(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    return greedy(model, inputs, NEW_TOKENS)


def save(model, path: Path) -> Path:
    """A sharded checkpoint, as `save_pretrained` writes it."""
    model.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def reseal(store: Path, name: str) -> None:
    """Records file `name`'s present size and CRC-32 in the store's index, as
    a store written that way would have them."""
    index = json.loads((store / "moe-store.json").read_text())
    data = (store / name).read_bytes()
    [entry] = [e for e in index["files"] if e["name"] == name]
    entry.update(bytes=len(data), crc32=zlib.crc32(data))
    (store / "moe-store.json").write_text(json.dumps(index))


def digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()
    }


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(family, plain model, its checkpoint, its expert store)."""
    family = request.param
    model = build(family)
    root = tmp_path_factory.mktemp(family)
    checkpoint = save(model, root / "checkpoint")
    store = root / "store"
    summary = moe_offload.convert(checkpoint, store)
    assert summary.experts == sum(b.num_experts for b in moe_offload.adapters.find_expert_blocks(model))
    return family, model, checkpoint, store


@pytest.mark.parametrize("source", ["checkpoint in place", "converted store"])
def test_from_pretrained_generates_what_the_plain_model_generates(saved, source):
    family, model, checkpoint, store = saved
    inputs = prompt(family)
    plain_tokens, plain_logits = generate(model, inputs)
    model.set_experts_implementation("eager")
    eager_tokens, eager_logits = generate(model, inputs)
    model.set_experts_implementation(None)
    experts = expert_bytes(model)
    path = checkpoint if source == "checkpoint in place" else store
    loaded, offloader = moe_offload.from_pretrained(
        path, device="cpu", device_budget=experts // 4, host_budget=int(experts * 0.4)
    )
    tokens, logits = generate(loaded, inputs)
    stats = offloader.stats()

    assert torch.equal(tokens, plain_tokens)
    assert torch.equal(tokens, eager_tokens)
    assert torch.equal(logits, eager_logits), "same arithmetic must give bit-identical logits"
    assert (logits - plain_logits).abs().max().item() <= 1e-5
    assert stats["host_budget_bytes"] < experts, "the host cache is smaller than the experts"
    assert stats["host_misses"] > 0 and stats["bytes_from_store"] > 0, "experts came from disk"
    assert stats["store_direct_io"] == (source == "converted store" and _direct_io_works(store))
    assert all(p.is_meta for n, p in loaded.named_parameters() if ".experts." in n and "shared" not in n)
    moe_offload.unpatch(loaded)
    original = dict(model.named_parameters())
    assert all(torch.equal(p, original[n]) for n, p in loaded.named_parameters()), "unpatch gives the weights"


def _direct_io_works(store: Path) -> bool:
    try:
        fd = os.open(store / "layer-000.bin", os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def test_checkpoint_is_converted_on_first_use_and_reused_after(saved, tmp_path):
    family, model, checkpoint, _ = saved
    store = tmp_path / "store"
    experts = expert_bytes(model)
    first, _ = moe_offload.from_pretrained(
        checkpoint, device="cpu", host_budget=experts // 2, store_dir=store
    )
    index = store / "moe-store.json"
    assert index.is_file()
    written = index.stat().st_mtime_ns
    second, _ = moe_offload.from_pretrained(
        checkpoint, device="cpu", host_budget=experts // 2, store_dir=store
    )
    assert index.stat().st_mtime_ns == written, "an existing store is used, not rewritten"
    inputs = prompt(family)
    assert torch.equal(generate(first, inputs)[0], generate(second, inputs)[0])
    layout = json.loads(index.read_text())
    assert all(blob["offset"] % 4096 == 0 for layer in layout["layers"] for blob in layer["blobs"])
    assert {"name", "dtype", "shape", "offset"} <= set(layout["layers"][0]["tensors"][0])


def test_a_host_budget_that_holds_every_expert_reads_them_all_up_front(saved):
    family, model, _, store = saved
    experts = expert_bytes(model)
    loaded, offloader = moe_offload.from_pretrained(
        store, device="cpu", host_budget=4 * experts, device_budget=experts // 4
    )
    count = sum(b.num_experts for b in offloader.blocks)
    stats = offloader.stats()
    assert stats["host_slots"] == count
    # The up-front read shows in the statistics.
    assert stats["host_staged"] == count and stats["bytes_from_store"] >= experts
    tokens, _ = generate(loaded, prompt(family))
    assert torch.equal(tokens, generate(model, prompt(family))[0])
    stats = offloader.stats()
    assert stats["host_misses"] == 0 and stats["host_hits"] > 0, "generation read nothing from disk"
    assert stats["bytes_from_store"] == offloader.cache.host_stats()["bytes_from_store"] >= experts


def test_copying_on_the_cpu_the_device_budget_defaults_to_a_quarter_of_the_host_budget(saved):
    _, model, _, store = saved
    host_budget = expert_bytes(model) // 2
    _, offloader = moe_offload.from_pretrained(
        store, device="cpu", host_budget=host_budget, cpu_experts="never"
    )
    top_k = max(b.top_k for b in offloader.blocks)
    assert offloader.stats()["budget_bytes"] == max(host_budget // 4, top_k * offloader.slot_bytes)


def test_on_the_cpu_experts_run_from_the_host_cache_and_nothing_is_copied(saved):
    family, model, _, store = saved
    host_budget = expert_bytes(model) // 2  # below the experts: some are read from disk
    loaded, offloader = moe_offload.from_pretrained(store, device="cpu", host_budget=host_budget)
    tokens, logits = generate(loaded, prompt(family))
    plain_tokens, plain_logits = generate(model, prompt(family))
    stats = offloader.stats()
    assert (offloader.n_slots, stats["budget_bytes"], stats["bytes_to_device"]) == (0, 0, 0)
    assert stats["cpu_experts"] == stats["misses"] > 0
    assert stats["host_misses"] > 0, "the host cache could not hold every expert"
    assert torch.equal(tokens, plain_tokens)
    assert (logits - plain_logits).abs().max().item() <= 1e-5


def test_a_device_budget_that_holds_every_expert_loads_them_all_before_generating(saved):
    family, model, _, store = saved
    inputs = prompt(family)
    plain_tokens, _ = generate(model, inputs)
    experts = expert_bytes(model)
    loaded, offloader = moe_offload.from_pretrained(
        store, device="cpu", host_budget=experts // 2, device_budget=4 * experts
    )
    tokens, _ = generate(loaded, inputs)
    stats = offloader.stats()
    assert torch.equal(tokens, plain_tokens)
    assert stats["misses"] == 0 and stats["hits"] > 0, "every expert was in a device slot"


def test_a_host_budget_below_one_tokens_experts_states_the_minimum(saved):
    family, plain, _, store = saved
    with pytest.raises(BudgetError, match=r"at least \d+ bytes") as info:
        moe_offload.from_pretrained(store, device="cpu", host_budget="4KiB")
    minimum = int(str(info.value).split("at least ")[1].split(" bytes")[0])
    with pytest.raises(BudgetError):
        moe_offload.from_pretrained(store, device="cpu", host_budget=minimum - 1)
    model, _ = moe_offload.from_pretrained(store, device="cpu", host_budget=minimum)
    assert torch.equal(generate(model, prompt(family))[0], generate(plain, prompt(family))[0])


def test_converting_to_another_dtype(saved, tmp_path):
    family, model, checkpoint, _ = saved
    store = tmp_path / "bf16"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_offload.cli",
            "convert",
            str(checkpoint),
            str(store),
            "--dtype",
            "bfloat16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "experts" in result.stdout and "MB/s" in result.stdout
    # Into a log (not a terminal), progress is a few plain lines, no bar.
    progress = [line for line in result.stderr.splitlines() if line.startswith("converting experts")]
    assert "\r" not in result.stderr and 1 <= len(progress) <= 4, result.stderr
    assert progress[-1].startswith("converting experts: 100%")
    loaded, _ = moe_offload.from_pretrained(store, device="cpu", host_budget=expert_bytes(model))
    assert loaded.dtype == torch.bfloat16
    reference = build(family).to(torch.bfloat16)
    reference.set_experts_implementation("eager")
    assert torch.equal(generate(loaded, prompt(family))[0], generate(reference, prompt(family))[0])
    with pytest.raises(StoreError, match="bfloat16"):
        moe_offload.from_pretrained(store, device="cpu", dtype="float32")
    with pytest.raises(StoreError, match="cannot be read in place"):
        moe_offload.from_pretrained(checkpoint, device="cpu", dtype="bfloat16")


# --- damage: each error names the file and says what to do; nothing is modified


@pytest.fixture
def mixtral(tmp_path):
    model = build("mixtral")
    checkpoint = save(model, tmp_path / "checkpoint")
    store = tmp_path / "store"
    moe_offload.convert(checkpoint, store)
    return model, checkpoint, store


def test_a_corrupt_blob_is_named_at_its_first_read_and_the_store_is_left_alone(mixtral):
    model, _, store = mixtral
    layer_file = store / "layer-000.bin"
    stride = json.loads((store / "moe-store.json").read_text())["layers"][0]["stride"]
    experts = expert_bytes(model)

    def flip(expert: int) -> None:
        data = bytearray(layer_file.read_bytes())
        data[4096 + expert * stride + 100] ^= 0x01
        layer_file.write_bytes(bytes(data))

    flip(3)  # one byte of one expert
    before = digest(store)
    # Reading every expert up front finds it before generation starts.
    with pytest.raises(
        StoreError, match=r"layer-000\.bin.*checksum mismatch in expert 3 of MoE layer 0.*convert"
    ):
        moe_offload.from_pretrained(store, device="cpu", host_budget=4 * experts)
    assert digest(store) == before, "reading never writes"
    # Read lazily, the first expert read fails generation, naming file and expert.
    for expert in (0, 1, 2, 4, 5, 6, 7):
        flip(expert)
    before = digest(store)
    loaded, _ = moe_offload.from_pretrained(
        store, device="cpu", host_budget=experts // 2, device_budget=experts // 4
    )
    with pytest.raises(
        MoeOffloadError, match=r"layer-000\.bin.*checksum mismatch in expert \d of MoE layer 0"
    ):
        generate(loaded, prompt("mixtral"))
    assert digest(store) == before, "reading never writes"
    # A device budget that holds every expert loads them all before returning:
    # found before generation, and the failed load reads nothing back.
    with pytest.raises(StoreError, match=r"layer-000\.bin.*checksum mismatch in expert \d"):
        moe_offload.from_pretrained(store, device="cpu", host_budget=experts // 2, device_budget=4 * experts)
    assert digest(store) == before, "reading never writes"


def test_every_byte_the_store_serves_is_checksummed(mixtral):
    _, _, store = mixtral
    # The config: one word changed, same size; only a checksum can tell.
    config = store / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"silu"', '"gelu"'))
    assert config.read_text() != text and len(config.read_text()) == len(text)
    with pytest.raises(StoreError, match=r"config\.json: checksum mismatch.*moe-offload convert"):
        moe_offload.from_pretrained(store, device="cpu")
    config.write_text(text)
    # The non-expert weights: a flipped byte in a tensor, or in the header,
    # is found while they load, before the model is handed out.
    weights = store / "non-experts.safetensors"
    original = weights.read_bytes()
    for at in (len(original) - 3, 20):
        damaged = bytearray(original)
        damaged[at] ^= 0x01
        weights.write_bytes(bytes(damaged))
        before = digest(store)
        with pytest.raises(
            StoreError, match=r"non-experts\.safetensors: .*(checksum mismatch|not a readable)"
        ):
            moe_offload.from_pretrained(store, device="cpu")
        assert digest(store) == before, "reading never writes"
    weights.write_bytes(original)
    moe_offload.from_pretrained(store, device="cpu")


def test_a_store_index_or_config_that_convert_did_not_write_is_refused_by_name(mixtral):
    _, _, store = mixtral
    index_path = store / "moe-store.json"
    index = json.loads(index_path.read_text())
    for meta in ({}, None, {**index["meta"], "source": {}}, {**index["meta"], "dtype": "int7"}):
        index_path.write_text(json.dumps({**index, "meta": meta}))
        with pytest.raises(StoreError, match=r"moe-store\.json: .*(meta|dtype).*moe-offload convert"):
            moe_offload.from_pretrained(store, device="cpu")
    index_path.write_text(json.dumps(index))
    (store / "config.json").write_text("{ not json")
    reseal(store, "config.json")
    with pytest.raises(StoreError, match=r"config\.json: is not a usable model config"):
        moe_offload.from_pretrained(store, device="cpu")


def test_a_checkpoint_that_is_not_one_is_named_with_what_to_do(mixtral, tmp_path, monkeypatch):
    _, checkpoint, _ = mixtral
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    (bare / "config.json").unlink()
    with pytest.raises(StoreError, match=r"bare: has no config\.json"):
        moe_offload.convert(bare, tmp_path / "new-store")
    monkeypatch.chdir(tmp_path)
    hub_id = "mistralai/Mixtral-8x7B-v0.1"
    hint = r"does not exist\. It looks like a Hugging Face Hub model id.*huggingface-cli download mistralai/"
    with pytest.raises(StoreError, match=hint):
        moe_offload.convert(hub_id, tmp_path / "new-store")
    with pytest.raises(StoreError, match=hint):
        moe_offload.from_pretrained(hub_id, device="cpu")
    assert not (tmp_path / "new-store").exists()


def test_converting_into_a_read_only_place_says_so(mixtral, tmp_path):
    _, checkpoint, _ = mixtral
    place = tmp_path / "read-only"
    place.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(place)], capture_output=True
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    else:
        place.chmod(0o555)
    try:
        with pytest.raises(
            StoreError, match=r"store: cannot be written: .*read-only or not writable"
        ) as info:
            moe_offload.convert(checkpoint, place / "store")
        assert "free" not in str(info.value)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(place)], check=True)
        else:
            place.chmod(0o755)


def _hub_snapshot(checkpoint: Path, root: Path) -> Path:
    """`checkpoint` as the Hub cache holds it: each file a link to a blob
    named by its sha256 (weights, stored with LFS) or git blob id."""
    blobs, snapshot = root / "blobs", root / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in checkpoint.iterdir():
        data = path.read_bytes()
        name = _hub_hash(path, data)
        (blobs / name).write_bytes(data)
        (snapshot / path.name).symlink_to(Path("../../blobs") / name)
    return snapshot


def _hub_hash(path: Path, data: bytes) -> str:
    """What the Hub records for a file: the sha256 of a weights file (an LFS
    object), the git blob id of any other."""
    if path.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _local_dir_download(checkpoint: Path, root: Path) -> Path:
    """`checkpoint` as `huggingface-cli download --local-dir` leaves it: the
    files, and per file its commit, hash and time under `.cache`."""
    shutil.copytree(checkpoint, root)
    metadata = root / ".cache" / "huggingface" / "download"
    metadata.mkdir(parents=True)
    for path in checkpoint.iterdir():
        data = path.read_bytes()
        etag = _hub_hash(path, data)
        (metadata / f"{path.name}.metadata").write_text(f"0123abcd\n{etag}\n{path.stat().st_mtime + 10}\n")
    return root


@pytest.mark.parametrize("layout", [_hub_snapshot, _local_dir_download])
def test_convert_verifies_a_hub_download_against_its_recorded_hashes(mixtral, tmp_path, layout):
    _, checkpoint, _ = mixtral
    download = layout(checkpoint, tmp_path / "download")
    moe_offload.convert(download, tmp_path / "verified", verify=True)
    moe_offload.from_pretrained(tmp_path / "verified", device="cpu")
    shard = (download / "model-00002-of-00013.safetensors").resolve()
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(
        StoreError, match=r"model-00002-of-00013\.safetensors: its sha256 is .* Download it again"
    ):
        moe_offload.convert(download, tmp_path / "damaged", verify=True)
    assert not (tmp_path / "damaged").exists()
    # A checkpoint with no recorded hashes has nothing to verify against.
    with pytest.raises(StoreError, match="nothing to verify it against"):
        moe_offload.convert(checkpoint, tmp_path / "plain", verify=True)
    # The command offers the same check.
    from moe_offload.cli import main

    assert main(["convert", str(download), str(tmp_path / "by-command"), "--verify"]) == 2
    assert not (tmp_path / "by-command").exists()


def test_a_missing_shard_is_named_before_anything_is_written(mixtral, tmp_path):
    _, checkpoint, _ = mixtral
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[3]
    (checkpoint / shard).unlink()
    store = tmp_path / "new-store"
    with pytest.raises(StoreError, match=f"{shard}: is missing") as info:
        moe_offload.from_pretrained(checkpoint, device="cpu", store_dir=store)
    assert "Download or copy" in str(info.value)
    assert not store.exists()
    with pytest.raises(StoreError, match=f"{shard}: is missing"):
        moe_offload.from_pretrained(checkpoint, device="cpu")


def test_a_truncated_shard_is_named(mixtral):
    _, checkpoint, _ = mixtral
    shard = checkpoint / "model-00003-of-00013.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StoreError, match=r"model-00003-of-00013\.safetensors: is truncated"):
        moe_offload.from_pretrained(checkpoint, device="cpu")


def test_a_missing_or_truncated_blob_file_is_named_before_generation(mixtral):
    _, _, store = mixtral
    layer_file = store / "layer-002.bin"
    layer_file.write_bytes(layer_file.read_bytes()[:-4096])
    with pytest.raises(StoreError, match=r"layer-002\.bin: is \d+ bytes but the store's index says \d+"):
        moe_offload.from_pretrained(store, device="cpu")
    layer_file.unlink()
    with pytest.raises(StoreError, match=r"layer-002\.bin: is missing"):
        moe_offload.from_pretrained(store, device="cpu")


def test_a_truncated_index_is_refused(mixtral):
    _, _, store = mixtral
    index = store / "moe-store.json"
    index.write_bytes(index.read_bytes()[:-50])
    with pytest.raises(StoreError, match=r"moe-store\.json: is damaged"):
        moe_offload.from_pretrained(store, device="cpu")


def test_a_store_that_disagrees_with_the_model_config_is_refused(mixtral):
    _, _, store = mixtral
    config = json.loads((store / "config.json").read_text())
    config["intermediate_size"] = 40
    (store / "config.json").write_text(json.dumps(config))
    # config.json is part of the store: its size is checked too.
    with pytest.raises(StoreError, match=r"config\.json: is \d+ bytes"):
        moe_offload.from_pretrained(store, device="cpu")
    reseal(store, "config.json")  # as if the store had been converted for that config
    with pytest.raises(
        StoreError, match=r"layer-000\.bin: experts 0-7 of MoE layer 0 .* \[96, 32\].*\[80, 32\]"
    ):
        moe_offload.from_pretrained(store, device="cpu")


def test_a_checkpoint_that_disagrees_with_its_config_is_refused(mixtral):
    _, checkpoint, _ = mixtral
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_local_experts"] = 6
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(StoreError, match=r"holds 8 tensors .* the model config has 6 experts"):
        moe_offload.from_pretrained(checkpoint, device="cpu")


def test_a_store_of_another_checkpoint_is_not_used(mixtral, tmp_path):
    _, _, store = mixtral
    other = save(build("mixtral", seed=1), tmp_path / "other")
    with pytest.raises(StoreError, match="converted from another checkpoint"):
        moe_offload.from_pretrained(other, device="cpu", store_dir=store)


def test_an_existing_directory_is_not_overwritten_unless_asked(mixtral):
    _, checkpoint, store = mixtral
    before = digest(store)
    with pytest.raises(StoreError, match="overwrite"):
        moe_offload.convert(checkpoint, store)
    assert digest(store) == before
    moe_offload.convert(checkpoint, store, overwrite=True)
    moe_offload.from_pretrained(store, device="cpu")


def test_an_interrupted_conversion_leaves_nothing(mixtral, tmp_path, monkeypatch):
    _, checkpoint, _ = mixtral
    calls = {"n": 0}
    real = moe_offload.checkpoint.WeightMap.expert_tensor

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(moe_offload.checkpoint.WeightMap, "expert_tensor", interrupted)
    store = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        moe_offload.convert(checkpoint, store)
    assert not store.exists(), "the directory the conversion created is removed"
    existing = tmp_path / "existing"
    existing.mkdir()
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        moe_offload.convert(checkpoint, existing)
    assert list(existing.iterdir()) == [], "a directory that existed is emptied of partial output"


KILLED_CONVERSION = """
import os, signal, sys
import moe_offload
from moe_offload.checkpoint import WeightMap
real = WeightMap.expert_tensor
calls = [0]
def dying(self, *args):
    calls[0] += 1
    if calls[0] == 20:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args)
WeightMap.expert_tensor = dying
moe_offload.convert(sys.argv[1], sys.argv[2])
"""


def test_a_killed_conversion_leaves_no_store_and_the_next_one_clears_its_leftovers(mixtral, tmp_path):
    plain, checkpoint, _ = mixtral
    store = tmp_path / "killed"
    result = subprocess.run(
        [sys.executable, "-c", KILLED_CONVERSION, str(checkpoint), str(store)],
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL
    assert not store.exists(), "a store appears only when it is complete"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".killed"))
    assert len(leftovers) == 2 and leftovers[0] == ".killed.lock", leftovers
    assert leftovers[1].startswith(".killed.partial-"), "the staging directory beside the store"
    with pytest.raises(StoreError, match="does not exist"):
        moe_offload.from_pretrained(store, device="cpu")
    # Converting again (here on first use) clears the leftovers.
    model, _ = moe_offload.from_pretrained(checkpoint, device="cpu", store_dir=store)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".killed")]
    assert torch.equal(generate(model, prompt("mixtral"))[0], generate(plain, prompt("mixtral"))[0])


def test_a_full_disk_is_a_clear_error_and_the_partial_output_is_removed(mixtral, tmp_path, monkeypatch):
    _, checkpoint, _ = mixtral
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        store = mount / "store"
        with pytest.raises(StoreError, match=r"needs .* only .* free") as info:
            moe_offload.convert(checkpoint, store)
        assert "choose another directory" in str(info.value)
        assert not store.exists()
        # Past the up-front check, the disk filling up during writing is caught too.
        monkeypatch.setattr(moe_offload.conversion, "_check_target", lambda *args: None)
        with pytest.raises(StoreError, match="no space left on the device") as info:
            moe_offload.convert(checkpoint, store)
        assert "partial output" in str(info.value)
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_asking_for_cuda_without_a_gpu_is_refused_before_converting(mixtral, tmp_path):
    _, checkpoint, _ = mixtral
    with pytest.raises(MoeOffloadError, match="no CUDA device"):
        moe_offload.from_pretrained(checkpoint, device="cuda", store_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_the_convert_command_reports_errors_by_name(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_offload.cli",
            "convert",
            str(tmp_path / "nowhere"),
            str(tmp_path / "store"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "nowhere" in result.stderr and not (tmp_path / "store").exists()


def test_a_directory_that_is_neither_is_refused(tmp_path):
    with pytest.raises(StoreError, match="not a moe-offload expert store"):
        moe_offload.from_pretrained(tmp_path, device="cpu")
    with pytest.raises(StoreError, match="does not exist"):
        moe_offload.from_pretrained(tmp_path / "nowhere", device="cpu")


@pytest.mark.gpu
def test_three_tiers_on_cuda_generate_what_the_plain_model_generates(mixtral):
    model, checkpoint, store = mixtral
    inputs = {k: v.to("cuda") for k, v in prompt("mixtral").items()}
    model.to("cuda").set_experts_implementation("eager")
    expected, expected_logits = generate(model, inputs)
    experts = expert_bytes(model)
    loaded, offloader = moe_offload.from_pretrained(
        store, device="cuda", device_budget=experts // 4, host_budget=int(experts * 0.4)
    )
    tokens, logits = generate(loaded, inputs)
    assert offloader.cache.host_pinned and offloader.stats()["backend"] == "cuda"
    assert torch.equal(tokens, expected)
    assert torch.equal(logits, expected_logits)
