"""The tensor cache: content-addressed slots, unreadable files recomputed, atomic writes."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from abliterate.cache import TensorCache, load_tensors, save_tensors


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"harmful": torch.randn(3, 2, 8, generator=g), "harmless": torch.randn(4, 2, 8, generator=g)}


def _equal(a, b) -> bool:
    return a is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _names(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_slots_per_content_key(tmp_path):
    cache = TensorCache(tmp_path / "cache")
    assert cache.load("residuals", "aaaa") is None  # nothing yet, and no dir needed
    run, other = _tensors(0), _tensors(1)
    cache.save("residuals", "aaaa", run)
    cache.save("residuals", "bbbb", other)  # a one-off with other prompts ...
    assert _names(tmp_path / "cache") == ["residuals-aaaa.safetensors", "residuals-bbbb.safetensors"]
    assert _equal(cache.load("residuals", "aaaa"), run)  # ... does not evict the run's inputs
    assert _equal(cache.load("residuals", "bbbb"), other)
    cache.save("baseline", "aaaa", {"logprobs": torch.ones(2)}, info={"note": "x"})
    assert _equal(cache.load("baseline", "aaaa"), {"logprobs": torch.ones(2)})
    assert cache.load("baseline", "bbbb") is None


def test_least_recently_used_slots_beyond_keep_are_dropped(tmp_path, caplog):
    cache = TensorCache(tmp_path, keep=2)
    for i, key in enumerate(["k1", "k2"]):
        cache.save("residuals", key, _tensors(i))
        os.utime(cache.path("residuals", key), (1000 + i, 1000 + i))  # k1 older than k2
    cache.save("baseline", "k0", _tensors(9))  # another name: never counted against residuals
    os.utime(cache.path("baseline", "k0"), (1, 1))
    assert cache.load("residuals", "k1") is not None  # a hit marks k1 as recently used
    with caplog.at_level(logging.INFO, logger="abliterate.cache"):
        cache.save("residuals", "k3", _tensors(3))
    assert _names(tmp_path) == [
        "baseline-k0.safetensors",
        "residuals-k1.safetensors",
        "residuals-k3.safetensors",
    ]
    assert "residuals-k2.safetensors" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_unreadable_file_is_ignored_with_one_warning(tmp_path, caplog, damage):
    cache = TensorCache(tmp_path)
    path = cache.save("residuals", "aaaa", _tensors(0))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x01" * 64, "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="abliterate.cache"):
        assert cache.load("residuals", "aaaa") is None
        assert load_tensors(path, "aaaa") is None  # the old API too
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(len(r.getMessage().splitlines()) == 1 for r in warnings)
    assert "ignoring unreadable cache file" in warnings[0].getMessage() and path.name in warnings[0].getMessage()
    cache.save("residuals", "aaaa", _tensors(0))  # recomputed and written over it
    assert _equal(cache.load("residuals", "aaaa"), _tensors(0))


def test_old_api_checks_the_key(tmp_path):
    path = tmp_path / "cache" / "residuals.safetensors"
    save_tensors(path, _tensors(0), key="one", info={"method": "mean"})
    assert _equal(load_tensors(path, "one"), _tensors(0))
    assert load_tensors(path, "two") is None
    assert _names(path.parent) == ["residuals.safetensors"]


def test_failed_write_leaves_no_temp_file(tmp_path):
    cache = TensorCache(tmp_path)
    blocker = cache.path("residuals", "aaaa")
    blocker.mkdir()  # the final rename fails after the temp file was written
    (blocker / "x").write_text("keep")
    with pytest.raises(OSError):
        cache.save("residuals", "aaaa", _tensors(0))
    assert _names(tmp_path) == [blocker.name]
    assert (blocker / "x").read_text() == "keep"


def test_temp_files_of_dead_writers_are_removed(tmp_path, caplog):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(proc.stdout), os.getppid()
    stale = tmp_path / f".residuals-aaaa.safetensors.tmp-{dead}"
    live = tmp_path / f".residuals-bbbb.safetensors.tmp-{alive}"
    stale.write_bytes(b"half")
    live.write_bytes(b"in progress")
    with caplog.at_level(logging.WARNING, logger="abliterate.cache"):
        TensorCache(tmp_path).save("baseline", "cccc", _tensors(0))
    assert _names(tmp_path) == sorted(["baseline-cccc.safetensors", live.name])
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"removing {stale}, left by a cache write whose process is gone"
    ]


def test_names_and_keys_must_be_file_safe(tmp_path):
    cache = TensorCache(tmp_path)
    for name, key in [("../x", "aaaa"), ("residuals", "a/b"), ("residuals", "a-b"), ("", "aaaa")]:
        with pytest.raises(ValueError):
            cache.path(name, key)


def test_a_write_killed_midway_leaves_nothing_the_next_save_does_not_remove(tmp_path):
    """kill -9 during a cache write: every temp it leaves carries our name and is removed by the next save."""
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import torch\nfrom abliterate.cache import TensorCache\n"
        f"TensorCache({str(tmp_path)!r}).save('residuals', 'k1', {{'x': torch.zeros(150_000_000)}})\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    TensorCache(tmp_path).save("residuals", "k1", {"x": torch.zeros(10)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["residuals-k1.safetensors"]
