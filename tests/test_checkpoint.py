"""Checkpoints: safetensors + JSON, atomic writes, verification, exact resume.

Shape legend: P parameters (the flat buffers).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from threadpoolctl import threadpool_limits

import nn_core.storage.checkpoint as ckpt_mod
from nn_core import CheckpointError, Config, MoETransformer
from nn_core.storage.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_training_checkpoint,
    save_model,
    sha256_file,
)
from nn_core.storage.ownership import RUN_MARKER
from nn_core.training.config import TrainConfig
from nn_core.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from resume_worker import make_sampler, make_train_config  # noqa: E402
from timeouts import SUBPROCESS_TIMEOUT  # noqa: E402

TINY = Config.tiny()
WORKER = Path(__file__).parent / "resume_worker.py"


def fixed_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1000, (2, 8)), rng.integers(0, 1000, (2, 8))  # [B, S] each


def trained(steps: int = 2, **kw: Any) -> Trainer:
    cfg = TrainConfig(batch_size=2, seq_len=8, lr=1e-3, warmup_steps=1, total_steps=30, **kw)
    trainer = Trainer(MoETransformer(TINY, seed=3), cfg)
    for s in range(steps):
        trainer.train_step(*fixed_batch(s))
    return trainer


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    """A training checkpoint directory after 2 updates."""
    return trained(2).save(tmp_path / "ckpt")


# ---- round trips -----------------------------------------------------------------------


def test_save_model_and_load_model_round_trip(tmp_path: Path) -> None:
    model = MoETransformer(TINY, seed=8)
    out = save_model(model, tmp_path / "weights")
    assert sorted(p.name for p in out.iterdir()) == [MODEL_FILE, STATE_FILE]
    state = json.loads((out / STATE_FILE).read_text())
    assert state["kind"] == "model" and state["config"] == TINY.to_dict()
    assert state["files"][MODEL_FILE]["sha256"] == sha256_file(out / MODEL_FILE)
    loaded = load_model(out)
    assert loaded.config == TINY and loaded.dtype == np.float32
    assert np.array_equal(loaded.flat_params, model.flat_params)
    assert set(load_file(str(out / MODEL_FILE))) == set(model.parameters())
    # the model's thin wrappers
    save_model(model, tmp_path / "again")
    again = load_model(tmp_path / "again")
    ids = fixed_batch()[0]
    assert np.array_equal(again.forward(ids), model.forward(ids))
    f64 = MoETransformer(TINY, seed=8, dtype=np.float64)
    assert load_model(save_model(f64, tmp_path / "f64")).dtype == np.float64


def test_load_model_reads_training_checkpoints_and_run_directories(tmp_path: Path) -> None:
    trainer = trained(2, checkpoint_interval=1)
    trainer.save_checkpoint(tmp_path)
    from_run = load_model(tmp_path)  # follows latest
    from_dir = load_model(tmp_path / "step_000002")
    for m in (from_run, from_dir):
        assert np.array_equal(m.flat_params, trainer.model.flat_params)


def test_trainer_save_and_resume_restore_everything(tmp_path: Path) -> None:
    sampler = make_sampler()
    trainer = Trainer(MoETransformer(TINY, seed=3), make_train_config(), data_source=sampler)
    trainer.fit(sampler, 3, progress=False)
    trainer.rng.random(5)  # move the trainer's generator off its seed
    path = trainer.save(tmp_path / "ckpt")
    assert trainer.last_checkpoint == path
    state = json.loads((path / STATE_FILE).read_text())
    assert state["format_version"] == ckpt_mod.FORMAT_VERSION and state["kind"] == "training"
    assert state["step"] == 3 and state["optimizer"] == {"type": "AdamW", "t": 3}
    assert set(state["files"]) == {MODEL_FILE, OPTIMIZER_FILE}
    names = set(trainer.model.parameters())
    assert set(load_file(str(path / OPTIMIZER_FILE))) == {
        f"{k}.{n}" for k in ("m", "v") for n in names
    }

    sampler2 = make_sampler(seed=77)
    resumed = Trainer.resume(path, data_source=sampler2)
    assert resumed.config == trainer.config and resumed.step == 3
    assert resumed.optimizer.t == 3 and resumed.last_checkpoint == path
    assert np.array_equal(resumed.model.flat_params, trainer.model.flat_params)
    assert np.array_equal(resumed.optimizer.m, trainer.optimizer.m)
    assert np.array_equal(resumed.optimizer.v, trainer.optimizer.v)
    assert resumed.rng.bit_generator.state == trainer.rng.bit_generator.state
    assert sampler2.state_dict() == sampler.state_dict()
    a = trainer.fit(sampler, 2, progress=False)
    b = resumed.fit(sampler2, 2, progress=False)
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    assert np.array_equal(resumed.model.flat_params, trainer.model.flat_params)


def test_data_state_with_arrays_round_trips(tmp_path: Path) -> None:
    class Source:
        def __init__(self) -> None:
            self.pos = np.array([3, 1, 4], dtype=np.int64)

        def state_dict(self) -> dict[str, Any]:
            return {"pos": self.pos, "epoch": np.int64(2)}

        def load_state_dict(self, d: dict[str, Any]) -> None:
            self.pos = d["pos"]
            self.epoch = d["epoch"]

    trainer = Trainer(MoETransformer(TINY), TrainConfig(), data_source=Source())
    target = Source()
    target.pos = np.zeros(1, np.int64)
    Trainer.resume(trainer.save(tmp_path / "c"), data_source=target)
    assert target.pos.dtype == np.int64 and target.pos.tolist() == [3, 1, 4]
    assert target.epoch == 2
    with pytest.raises(CheckpointError, match="no data state"):
        Trainer.resume(trained(1).save(tmp_path / "d"), data_source=Source())


def test_exact_resume_in_a_fresh_process(tmp_path: Path) -> None:
    """N steps straight == k steps, save, resume in a new interpreter, N-k more: bitwise."""
    n, k = 6, 3
    with threadpool_limits(1):
        straight = Trainer(MoETransformer(TINY, seed=3), make_train_config())
        losses_straight = [m["loss"] for m in straight.fit(make_sampler(), n, progress=False)]
        first = Trainer(MoETransformer(TINY, seed=3), make_train_config())
        losses_first = [m["loss"] for m in first.fit(make_sampler(), k, progress=False)]
        first.save(tmp_path / "ckpt")
    done = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "ckpt"), str(n - k), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    losses_rest = json.loads((tmp_path / "losses.json").read_text())
    assert losses_first + losses_rest == losses_straight
    final = load_training_checkpoint(tmp_path / "final")
    assert final.state["step"] == n and final.state["optimizer"]["t"] == n
    assert np.array_equal(final.model.flat_params, straight.model.flat_params)
    assert np.array_equal(final.m, straight.optimizer.m)
    assert np.array_equal(final.v, straight.optimizer.v)
    assert final.state["data_state"] == straight.data_source.state_dict()


# ---- atomic writes ---------------------------------------------------------------------


class SimulatedCrash(Exception):
    pass


STAGES = [
    "model_written",
    "optimizer_written",
    "state_written",
    "before_rename",
    "after_rename",
    "before_latest",
]


@pytest.mark.parametrize("stage", STAGES)
def test_interrupted_save_leaves_previous_checkpoint_and_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    trainer = trained(2)
    trainer.save_checkpoint(tmp_path)
    good = trainer.model.flat_params.copy()
    trainer.train_step(*fixed_batch(9))

    def crash(at: str) -> None:
        if at == stage:
            raise SimulatedCrash(at)

    monkeypatch.setattr(ckpt_mod, "_fault_point", crash)
    with pytest.raises(SimulatedCrash):
        trainer.save_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path).name == "step_000002"
    loaded = load_training_checkpoint(tmp_path)
    assert loaded.state["step"] == 2 and np.array_equal(loaded.model.flat_params, good)
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != RUN_MARKER]
    assert not temps  # temps cleaned up (the run directory's marker stays)
    renamed = stage in ("after_rename", "before_latest")
    assert (tmp_path / "step_000003").exists() == renamed
    if renamed:  # in place, complete, just not yet the latest
        assert load_training_checkpoint(tmp_path / "step_000003").state["step"] == 3
    monkeypatch.undo()
    trainer.save_checkpoint(tmp_path)  # replaces a left-over step_000003 if there is one
    assert latest_checkpoint(tmp_path).name == "step_000003"
    assert np.array_equal(load_model(tmp_path).flat_params, trainer.model.flat_params)


def test_interrupted_save_model_keeps_the_old_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = MoETransformer(TINY, seed=1)
    save_model(old, tmp_path / "w")
    monkeypatch.setattr(ckpt_mod, "_fault_point", lambda at: (_ for _ in ()).throw(SimulatedCrash))
    with pytest.raises(SimulatedCrash):
        save_model(MoETransformer(TINY, seed=2), tmp_path / "w")
    assert np.array_equal(load_model(tmp_path / "w").flat_params, old.flat_params)


def test_leftovers_of_a_hard_crash_are_ignored_then_cleaned(tmp_path: Path) -> None:
    trainer = trained(1, keep_checkpoints=5)
    trainer.save_checkpoint(tmp_path)
    stale = tmp_path / ".step_000002.tmp-abc123"  # a save killed half way
    stale.mkdir()
    (stale / MODEL_FILE).write_bytes(b"\x00" * 10)
    (tmp_path / ".latest.tmp-xyz").write_text("step_000002\n")
    assert latest_checkpoint(tmp_path).name == "step_000001"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]
    load_training_checkpoint(tmp_path)
    trainer.train_step(*fixed_batch(4))
    trainer.save_checkpoint(tmp_path)
    assert not stale.exists() and not (tmp_path / ".latest.tmp-xyz").exists()


def test_keep_newest_n_checkpoints(tmp_path: Path) -> None:
    trainer = Trainer(
        MoETransformer(TINY, seed=3),
        TrainConfig(
            lr=1e-3, warmup_steps=1, total_steps=30, checkpoint_interval=1, keep_checkpoints=2
        ),
    )
    trainer.fit(lambda: fixed_batch(), 5, checkpoint_dir=tmp_path, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000005"]
    assert (tmp_path / "latest").read_text() == "step_000005\n"
    assert Trainer.resume(tmp_path).step == 5


# ---- verification ----------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def signed(state: dict[str, Any]) -> str:
    """state.json text with its ``state_sha256`` recomputed: SHA-256 of the compact, sorted
    JSON of every other field (the documented canonical form)."""
    rest = {k: v for k, v in state.items() if k != "state_sha256"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return json.dumps({**rest, "state_sha256": hashlib.sha256(canonical.encode()).hexdigest()})


def rewrite(ckpt: Path, name: str, mutate: Any) -> None:
    """Change a tensor file and record its new hash, as a consistent but wrong save would."""
    tensors = load_file(str(ckpt / name))
    mutate(tensors)
    save_file(tensors, str(ckpt / name))
    state = json.loads((ckpt / STATE_FILE).read_text())
    size = (ckpt / name).stat().st_size
    state["files"][name] = {"sha256": sha256_file(ckpt / name), "bytes": size}
    (ckpt / STATE_FILE).write_text(signed(state))


def edit_state(ckpt: Path, **changes: Any) -> None:
    """Change state.json fields and re-sign it, as a consistent but wrong save would."""
    state = json.loads((ckpt / STATE_FILE).read_text())
    state.update(changes)
    (ckpt / STATE_FILE).write_text(signed(state))


@pytest.mark.parametrize("name", [MODEL_FILE, OPTIMIZER_FILE])
def test_flipped_byte_is_rejected(saved: Path, name: str) -> None:
    size = (saved / name).stat().st_size
    flip_byte(saved / name, size // 2)  # inside the tensor data
    with pytest.raises(CheckpointError, match=f"{name} is corrupt: SHA-256 mismatch"):
        Trainer.resume(saved)


def test_flipped_header_byte_is_rejected(saved: Path) -> None:
    flip_byte(saved / MODEL_FILE, 20)  # inside the JSON header
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        load_model(saved)


def test_truncated_file_is_rejected(saved: Path) -> None:
    path = saved / OPTIMIZER_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors is truncated: \d+ bytes"):
        Trainer.resume(saved)
    path = saved / MODEL_FILE
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(CheckpointError, match="expected .* bytes"):
        load_model(saved)


def test_missing_files_are_rejected(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (saved / OPTIMIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors is missing"):
        Trainer.resume(saved)
    (saved / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="state.json is missing"):
        load_model(saved)


def test_missing_and_unexpected_tensors_are_rejected(saved: Path) -> None:
    rewrite(saved, MODEL_FILE, lambda t: t.pop("layers.1.moe.router.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor\(s\) \['layers.1.moe.router.weight'\]"
    ):
        load_model(saved)
    rewrite(
        saved,
        MODEL_FILE,
        lambda t: t.update(
            {
                "layers.1.moe.router.weight": np.zeros((4, 64), np.float32),
                "extra.weight": np.zeros(3, np.float32),
            }
        ),
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) \['extra.weight'\]"):
        load_model(saved)


def test_missing_optimizer_tensor_is_rejected(saved: Path) -> None:
    rewrite(saved, OPTIMIZER_FILE, lambda t: t.pop("v.lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['v.lm_head.weight'\]"):
        Trainer.resume(saved)


def test_wrong_shape_and_dtype_are_rejected(saved: Path) -> None:
    rewrite(saved, MODEL_FILE, lambda t: t.update({"final_norm.weight": np.ones(32, np.float32)}))
    with pytest.raises(CheckpointError, match=r"final_norm.weight has shape \(32,\).*\(64,\)"):
        load_model(saved)
    rewrite(saved, MODEL_FILE, lambda t: t.update({"final_norm.weight": np.ones(64, np.float64)}))
    with pytest.raises(CheckpointError, match="final_norm.weight has dtype float64"):
        load_model(saved)


def test_checkpoint_of_another_config_is_rejected(saved: Path) -> None:
    other = TINY.replace(hidden_dim=32)
    with pytest.raises(CheckpointError, match="different config.*hidden_dim: checkpoint 64"):
        load_model(saved, config=other)
    with pytest.raises(CheckpointError, match="different config"):
        Trainer.resume(saved, config=other)
    # a state.json that claims another config than the tensors hold
    edit_state(saved, config=other.to_dict())
    with pytest.raises(CheckpointError, match="shape .* another config"):
        load_model(saved)
    edit_state(saved, config={**TINY.to_dict(), "head_dim": 15})  # odd: invalid
    with pytest.raises(CheckpointError, match="invalid config"):
        load_model(saved)


def test_bad_state_json_is_rejected(saved: Path) -> None:
    good = (saved / STATE_FILE).read_text()
    edit_state(saved, format_version=99)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_model(saved)
    (saved / STATE_FILE).write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(saved)
    (saved / STATE_FILE).write_text(good)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        Trainer.resume(save_model(trained(1).model, saved.parent / "weights_only"))
    edit_state(saved, kind="model")  # a "model" state.json holding training fields
    with pytest.raises(CheckpointError, match="unexpected field"):
        Trainer.resume(saved)


def test_latest_pointing_nowhere_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "latest").write_text("step_000042\n")
    with pytest.raises(CheckpointError, match="points to 'step_000042', which does not exist"):
        load_model(tmp_path)
    (tmp_path / "latest").write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match="invalid checkpoint name"):
        Trainer.resume(tmp_path)


def test_tensor_files_are_safetensors_not_pickle(saved: Path) -> None:
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        raw = (saved / name).read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_len])
        assert header["__metadata__"]["format"] == "nn-core"
        assert not raw.startswith(b"\x80")  # a pickle stream starts with PROTO 0x80
    assert os.listdir(saved) and all(p.suffix in (".safetensors", ".json") for p in saved.iterdir())


def test_checkpoint_files_get_the_umask_default_mode(tmp_path):
    """Temporary files and dirs start 0600/0700; what lands must be as readable as mkdir's."""
    import stat

    from nn_core import Config, MoETransformer
    from nn_core.storage.checkpoint import save_model

    umask = os.umask(0o022)
    try:
        out = save_model(MoETransformer(Config.tiny(), seed=0), tmp_path / "model")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
