"""Writes never leave half files and fail with one clear line; damaged model files name themselves and say what
to do; an offline machine fails at once instead of retrying downloads.

Root ignores chmod, so read-only folders, permission errors and full disks are simulated by making the
operating system calls raise the errors they raise (and, for a real read-only folder, a test skipped as root).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import frugalseg.data.io as fio
from frugalseg.data.io import (
    TEMP_SUFFIX,
    atomic_path,
    is_stale_temporary,
    make_folder,
    remove_stale_temporaries,
    write_json,
    write_text,
)
from frugalseg.errors import ConfigError, DataError, OutputError
from frugalseg.runs import RunDir

SPEC = {"arch": "unet2d", "num_classes": 2, "in_chans": 3, "channels": [4, 8]}  # 1.5 k parameters


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _no_space(folder, *a, **k):
    return type("usage", (), {"total": 10**9, "used": 10**9, "free": 0})()


def _plenty(folder, *a, **k):
    return type("usage", (), {"total": 10**12, "used": 0, "free": 10**12})()


# ---- atomic writes ---------------------------------------------------------------------------------------
def test_disk_full_during_a_checkpoint_save_leaves_no_temporary_and_says_so(tmp_path, monkeypatch):
    """torch.save reports a full disk only as "unexpected pos" (seen on a real 2 MB tmpfs): the folder's free
    space tells. The earlier checkpoint stays, nothing else is left, the message names the checkpoint."""
    from frugalseg.stages.engine import AtomicCheckpointIO

    monkeypatch.chdir(tmp_path)
    target = Path("runs/x/checkpoints/last.ckpt")
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, target)
    before = target.read_bytes()

    def partial_save(obj, f, *a, **k):
        Path(f).write_bytes(b"\0" * 4096)  # half a checkpoint, then the disk is full
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", partial_save)
    monkeypatch.setattr(fio.shutil, "disk_usage", _no_space)
    with pytest.raises(OutputError) as info:
        AtomicCheckpointIO().save_checkpoint({"epoch": 2}, target)
    msg = str(info.value)
    assert msg == ("cannot write runs/x/checkpoints/last.ckpt: no space left on the device holding "
                   "runs/x/checkpoints (free some space, or choose another --out).")
    assert "\n" not in msg and ".tmp" not in msg
    assert _files(tmp_path / "runs") == ["x/checkpoints/last.ckpt"] and target.read_bytes() == before


def test_a_write_error_that_is_not_the_disk_keeps_its_own_error(tmp_path, monkeypatch):
    """Not every failure is the file system's: a bug keeps its exception (and traceback), temp removed, even when
    the disk happens to be nearly full (free space decides only for a write failure reported without an errno)."""
    monkeypatch.setattr(fio.shutil, "disk_usage", _no_space)
    with pytest.raises(TypeError, match="cannot pickle"):
        with atomic_path(tmp_path / "a.ckpt") as tmp:
            tmp.write_bytes(b"x")
            raise TypeError("cannot pickle 'generator' object")
    with pytest.raises(ValueError, match="unknown file extension"):  # what PIL raises for a bad format
        with atomic_path(tmp_path / "a.xyz") as tmp:
            raise ValueError("unknown file extension: .xyz")
    with pytest.raises(DataError, match="bad spacing"):  # an explained error inside the block stays as it is
        with atomic_path(tmp_path / "b.nii.gz"):
            raise DataError("bad spacing")
    assert _files(tmp_path) == []


@pytest.mark.parametrize("error, cause", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device holding {d}"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded on the device holding {d}"),
    (OSError(errno.EROFS, "Read-only file system"), "the folder {d} is read-only"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied: {d} is not writable"),
    # safetensors: its own exception type, the OS error in the text; the disk itself looks fine
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "no space left on the device holding {d}"),
])
def test_file_system_errors_while_writing_name_the_target_and_the_cause(tmp_path, monkeypatch, error, cause):
    monkeypatch.setattr(fio.shutil, "disk_usage", _plenty)
    target = tmp_path / "out" / "model.safetensors"
    with pytest.raises(OutputError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            if isinstance(error, OSError):
                error.filename = str(tmp)  # as the OS reports it: the temporary name, which the user never sees
            raise error
    msg = str(info.value)
    assert msg.startswith(f"cannot write {target}: {cause.format(d=target.parent)}")
    assert TEMP_SUFFIX not in msg and "\n" not in msg
    assert _files(tmp_path) == []


def test_free_space_decides_only_for_a_write_failure(tmp_path, monkeypatch):
    """The same torch.save failure text is a full disk when the folder has no space left, and a plain write failure
    (with its own words) when it has; another exception is never turned into "no space left"."""
    from frugalseg.data.io import output_error

    target = tmp_path / "last.ckpt"
    failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(fio.shutil, "disk_usage", _no_space)
    assert str(output_error(failure, target)).startswith(f"cannot write {target}: no space left on the device")
    assert output_error(RuntimeError("CUDA error: device-side assert triggered"), target) is None
    assert output_error(ValueError("unknown file extension: .xyz"), target) is None
    monkeypatch.setattr(fio.shutil, "disk_usage", _plenty)
    assert str(output_error(failure, target)) == (
        f"cannot write {target}: the write failed ([enforce fail at inline_container.cc:672] . unexpected pos 704 "
        f"vs 598); check the device holding {tmp_path}.")


def test_only_an_explicit_cause_is_blamed(tmp_path, monkeypatch):
    """A full disk met and handled earlier (the implicit `__context__` of a later bug) is not the cause of that bug;
    an error raised `from` a full disk is."""
    monkeypatch.setattr(fio.shutil, "disk_usage", _plenty)
    with pytest.raises(KeyError, match="model"):
        with atomic_path(tmp_path / "a.json"):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise KeyError("model")  # a bug while handling the earlier error
    with pytest.raises(OutputError, match="no space left on the device"):
        with atomic_path(tmp_path / "b.json"):
            raise RuntimeError("saving failed") from OSError(errno.ENOSPC, "No space left on device")
    assert _files(tmp_path) == []


def test_a_failed_rename_and_an_interrupt_leave_nothing(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"

    def read_only_rename(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(src), None, str(dst))

    monkeypatch.setattr(fio.os, "replace", read_only_rename)
    with pytest.raises(OutputError, match=f"cannot write {target}: the folder {tmp_path} is read-only"):
        write_json(target, {"miou": 0.5})
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("{")
            raise KeyboardInterrupt
    assert _files(tmp_path) == []
    write_json(target, {"miou": 0.5})
    assert json.loads(target.read_text()) == {"miou": 0.5} and _files(tmp_path) == ["metrics.json"]


def test_an_unrelated_os_error_inside_the_block_is_not_blamed_on_the_output(tmp_path):
    """Reading another file inside the block fails: that file's error, not "cannot write"."""
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "out" / "a.png"):
            raise PermissionError(errno.EACCES, "Permission denied", "/data/images/1.png")
    assert _files(tmp_path) == []


@pytest.mark.parametrize("code, words", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only")])
def test_an_unwritable_folder_is_named(tmp_path, monkeypatch, code, words):
    """Creating the temporary file fails (the folder exists but cannot be written)."""
    real_open = os.open

    def refuse(path, flags, *a, **k):
        if flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), path)
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(fio.os, "open", refuse)
    target = tmp_path / "pred" / "1.png"
    with pytest.raises(OutputError) as info:
        write_text(target, "x")
    assert str(info.value).startswith(f"cannot write {target}: ") and words in str(info.value)
    assert f"{tmp_path / 'pred'}" in str(info.value)


@pytest.mark.parametrize("code, words", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only")])
def test_a_run_folder_that_cannot_be_created_is_named(tmp_path, monkeypatch, code, words):
    real_mkdir = Path.mkdir

    def refuse(self, *a, **k):
        if not self.exists():
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(OutputError) as info:
        RunDir(tmp_path / "runs" / "x")
    msg = str(info.value)
    assert msg.startswith(f"cannot create the folder {tmp_path / 'runs' / 'x'}: ") and words in msg
    assert "\n" not in msg


def test_a_file_in_the_way_of_a_folder_is_named(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(OutputError, match=f"{tmp_path / 'runs'} is a file, not a folder"):
        make_folder(tmp_path / "runs" / "x" / "checkpoints")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_real_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=f"cannot write {folder / 'a.txt'}: permission denied: {folder}"):
            write_text(folder / "a.txt", "x")
        with pytest.raises(OutputError, match=f"cannot create the folder {folder / 'run'}: permission denied"):
            RunDir(folder / "run")
    finally:
        folder.chmod(0o755)


# ---- stale temporaries -----------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_killed_processes_are_removed_when_a_run_is_opened(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "predictions" / "val").mkdir(parents=True)
    host, dead, alive = fio._HOST, _dead_pid(), os.getpid()
    stale = [
        run / "checkpoints" / f".last.ckpt.{dead}-{host}-0123abcd{TEMP_SUFFIX}",
        run / "predictions" / "val" / f".1.png.{dead}-{host}-89abcdef{TEMP_SUFFIX}",
        run / f".img.nii.gz.{dead}-{host}-00000000{TEMP_SUFFIX}.nii.gz",  # nibabel's inner temporary
        run / f".a.json.123-ffffff-00000000{TEMP_SUFFIX}",  # another machine's, untouched for two hours
    ]
    kept = [
        run / "checkpoints" / f".last.ckpt.{alive}-{host}-0123abcd{TEMP_SUFFIX}",  # a write in flight
        run / f".b.json.123-ffffff-00000000{TEMP_SUFFIX}",  # another machine's, just written
        # a user's files, however close to the pattern
        run / ".notes.tmp", run / "report.frugalseg.tmp.txt", run / f"x.{dead}-{host}-0123abcd{TEMP_SUFFIX}",
        run / f".x.{dead}-{host}-0123abcd.tmp", run / "model.safetensors", run / f".y.{dead}-{host}-0123{TEMP_SUFFIX}",
    ]
    for p in stale + kept:
        p.write_bytes(b"x")
    old = time.time() - 2 * fio.STALE_AFTER_S
    os.utime(stale[3], (old, old))
    legacy = run / "checkpoints" / ".last.ckpt.tmp"  # what the checkpoint writer left before atomic_path's names
    legacy.write_bytes(b"x")
    os.utime(legacy, (old, old))
    RunDir(run)
    assert not any(p.exists() for p in stale) and not legacy.exists()
    assert all(p.exists() for p in kept)
    assert remove_stale_temporaries(run) == 0


def test_stale_temporaries_of_one_folder_only(tmp_path):
    """`recursive=False` (predict's output folder, which may hold a user's subfolders) looks in the folder alone."""
    dead, host = _dead_pid(), fio._HOST
    top = tmp_path / f".1.png.{dead}-{host}-0123abcd{TEMP_SUFFIX}"
    nested = tmp_path / "sub" / f".2.png.{dead}-{host}-0123abcd{TEMP_SUFFIX}"
    nested.parent.mkdir()
    top.write_bytes(b"x")
    nested.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path, recursive=False) == 1
    assert not top.exists() and nested.exists()
    assert remove_stale_temporaries(tmp_path) == 1 and not nested.exists()
    assert remove_stale_temporaries(tmp_path / "missing", recursive=False) == 0


def test_the_host_tag_tells_pid_namespaces_apart(monkeypatch):
    """Two containers with one hostname but their own PID namespaces, on a shared volume, must not take each
    other's live temporaries for a dead process's: the tag hashes the PID namespace (and boot) with the hostname,
    and is the hostname's alone where /proc does not tell them."""
    import hashlib
    import re
    import socket

    real_stat = os.stat

    def namespace(inode):
        def stat(path, *a, **k):
            if str(path) == "/proc/self/ns/pid":
                return os.stat_result((0o444, inode, 4, 1, 0, 0, 0, 0, 0, 0))
            return real_stat(path, *a, **k)
        return stat

    tags = []
    for inode in (4026531836, 4026532410):
        monkeypatch.setattr(fio.os, "stat", namespace(inode))
        tags.append(fio._host_identity())
    monkeypatch.setattr(fio.os, "stat", real_stat)
    assert tags[0] != tags[1] and all(re.fullmatch(r"[0-9a-f]{6}", t) for t in tags)
    assert re.fullmatch(r"[0-9a-f]{6}", fio._HOST)

    def no_proc(path, *a, **k):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))

    monkeypatch.setattr(fio.os, "stat", no_proc)
    monkeypatch.setattr(fio.Path, "read_text", no_proc)
    assert fio._host_identity() == hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def test_atomic_path_names_are_recognised_and_not_stale_while_in_flight(tmp_path):
    with atomic_path(tmp_path / "a.txt") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.txt.") and tmp.name.endswith(TEMP_SUFFIX)
        assert fio._TEMP_NAME.match(tmp.name) and not is_stale_temporary(tmp)
        assert remove_stale_temporaries(tmp_path) == 0 and tmp.exists()
        tmp.write_text("x")
    assert _files(tmp_path) == ["a.txt"]


def test_a_process_killed_mid_write_leaves_a_temporary_the_next_run_removes(tmp_path):
    run = tmp_path / "run"
    code = ("import os, signal, sys\nfrom frugalseg.data.io import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(run / "checkpoints" / "last.ckpt")], capture_output=True)
    assert proc.returncode == -9
    left = list((run / "checkpoints").iterdir())
    assert len(left) == 1 and left[0].name.endswith(TEMP_SUFFIX)  # the final name was never written
    RunDir(run)
    assert list((run / "checkpoints").iterdir()) == []


# ---- damaged stage markers -------------------------------------------------------------------------------
@pytest.mark.parametrize("content, words", [
    ('{"finished": "2026-01-01T00:00:00", "key": {"ep', "not valid JSON"),  # truncated
    (b"\xff\xfe\x00garbage", "not valid JSON"),  # overwritten with bytes
    ("[1, 2]", "not a stage marker"),  # valid JSON, but not a marker
])
def test_a_damaged_stage_marker_is_named(tmp_path, content, words):
    run = RunDir(tmp_path / "run")
    run.mark_done("train", key={"epochs": 2})
    assert run.stage_done("train", key={"epochs": 2}) and not run.stage_done("train", key={"epochs": 3})
    marker = run.path / "stages" / "train.done"
    if isinstance(content, bytes):
        marker.write_bytes(content)
    else:
        marker.write_text(content)
    for ask in (lambda: run.stage_done("train", key={"epochs": 2}),
                lambda: run.stage_made_with_other_settings("train", {"epochs": 2})):
        with pytest.raises(DataError) as info:
            ask()
        assert str(info.value).startswith(f"{marker}: {words}") and "delete" in str(info.value)
    assert run.stage_done("train")  # without settings to compare, the marker is not read


def test_a_folder_in_place_of_a_stage_marker_is_named(tmp_path):
    run = RunDir(tmp_path / "run")
    (run.path / "stages" / "train.started").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train\.started: is a folder, but a JSON file is expected"):
        run.stage_made_with_other_settings("train", {"epochs": 2})


# ---- damaged model files ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    from frugalseg.data.labels import LabelSpec
    from frugalseg.export import save_export
    from frugalseg.models import build_model

    run = tmp_path_factory.mktemp("run")
    save_export(build_model(SPEC), SPEC, LabelSpec(names=("background", "shape")), run / "model")
    return run


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_export_names_the_file_and_what_to_do(export_dir, tmp_path):
    from frugalseg.export import load_export

    run = _copy_run(export_dir, tmp_path / "run")
    model, spec, labels = load_export(run / "model")  # whole: loads
    assert spec == SPEC and labels.names == ("background", "shape")
    weights = run / "model" / "model.safetensors"
    for keep in (0.5, 0.001):
        _truncate(weights, keep)
        with pytest.raises(DataError) as info:
            load_export(run / "model")
        msg = str(info.value)
        assert msg.startswith(f"{weights}: truncated or corrupt (") and "\n" not in msg
        assert msg.endswith("re-export it by re-running training, or restore the file.")
    config = run / "model" / "config.json"
    _truncate(config)
    with pytest.raises(DataError, match=f"^{config}: truncated or corrupt .*re-export it"):
        load_export(run / "model")
    config.write_text(json.dumps({"format_version": 1, "model": {"arch": "unet2d"}, "labels": {}}))
    with pytest.raises(DataError, match=f"^{config}: incomplete model description"):
        load_export(run / "model")


def test_weights_that_do_not_fit_their_config_are_named(export_dir, tmp_path):
    from frugalseg.export import load_export

    run = _copy_run(export_dir, tmp_path / "run")
    config = run / "model" / "config.json"
    meta = json.loads(config.read_text())
    meta["model"]["channels"] = [8, 16]
    config.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=f"^{run / 'model' / 'model.safetensors'}: the weights do not fit"):
        load_export(run / "model")


def _checkpoint(path: Path) -> None:
    from frugalseg.models import build_model

    model = build_model(SPEC)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3,
                "frugalseg": {"format_version": 1, "labels": {"names": ["background", "shape"]}, "model": SPEC}}, path)


def test_a_truncated_checkpoint_names_the_file_and_what_to_do(tmp_path):
    from frugalseg.export import check_checkpoint, load_export

    ckpt = tmp_path / "runs" / "x" / "checkpoints" / "last.ckpt"
    _checkpoint(ckpt)
    assert check_checkpoint(ckpt) == {"format_version": 1, "labels": {"names": ["background", "shape"]}, "model": SPEC}
    assert load_export(ckpt)[1] == SPEC
    for keep in (0.5, 0.0):
        _truncate(ckpt, keep)
        with pytest.raises(DataError) as info:
            check_checkpoint(ckpt)
        msg = str(info.value)
        assert msg.startswith(f"{ckpt}: ") and "\n" not in msg
        assert msg.endswith("delete it to train from scratch, or pass a complete checkpoint.")
        with pytest.raises(DataError, match=f"^{ckpt}: .*pass a complete checkpoint, or the run's model/ export"):
            load_export(ckpt)
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(DataError, match="not a frugalseg checkpoint"):
        check_checkpoint(ckpt)
    with pytest.raises(DataError, match=f"^{tmp_path / 'none.ckpt'}: missing"):
        check_checkpoint(tmp_path / "none.ckpt")


def test_a_truncated_pretrained_weight_file_is_named(tmp_path):
    from frugalseg.models.backbones import read_state_dict

    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    _truncate(path)
    with pytest.raises(DataError, match=f"^{path}: truncated or corrupt weight file .*--pretrained PATH"):
        read_state_dict(path)
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x10\x00")
    with pytest.raises(DataError, match=f"^{path}: truncated or corrupt weight file"):
        read_state_dict(path)


def _fake_run(export_dir: Path, dst: Path, data: Path) -> Path:
    from frugalseg.stages.train import TrainConfig

    run = _copy_run(export_dir, dst)
    RunDir(run).save_config(TrainConfig(data=str(data), out=str(run), devices="cpu"))
    _truncate(run / "model" / "model.safetensors")
    return run


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_the_command_line_says_one_line_for_a_truncated_model(export_dir, shapes_dataset, tmp_path, command):
    run = _fake_run(export_dir, tmp_path / "run", shapes_dataset)
    args = (["eval", str(run)] if command == "eval" else
            ["predict", "--model", str(run), "--out", str(tmp_path / "pred"), str(shapes_dataset / "images")])
    proc = subprocess.run([sys.executable, "-m", "frugalseg.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=240)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {run / 'model' / 'model.safetensors'}: truncated or corrupt "
                     f"({lines[-1].split('(', 1)[1].split(')')[0]}); re-export it by re-running training, "
                     "or restore the file."], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# ---- offline timm backbone -------------------------------------------------------------------------------
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No weights in timm's caches (the Hugging Face hub's, torch hub's) and no offline switch set."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("FRUGALSEG_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


CHOICES = ("pass --pretrained PATH (a local weight file), --pretrained false (random init), "
           "or one of tf_efficientnet_lite0/1/2 (offline weights).")


def test_an_unreachable_server_fails_at_once_with_the_choices(empty_caches, monkeypatch):
    import timm  # noqa: F401 - imported before the clock starts

    from frugalseg.models import backbones
    from frugalseg.models.backbones import create_backbone

    probes = []

    def unreachable(url, timeout=backbones.PROBE_TIMEOUT_S):
        probes.append(url)
        return False

    monkeypatch.setattr(backbones, "reachable", unreachable)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        create_backbone("resnet18", pretrained=True)
    assert time.perf_counter() - start < 5
    assert str(info.value) == ("backbone resnet18: ImageNet weights are not on this machine and huggingface.co "
                               f"cannot be reached; {CHOICES}")
    assert probes == ["https://huggingface.co/"]


@pytest.mark.parametrize("var", ["FRUGALSEG_OFFLINE", "HF_HUB_OFFLINE"])
def test_an_offline_switch_fails_without_probing(empty_caches, monkeypatch, var):
    from frugalseg.models import backbones
    from frugalseg.models.backbones import create_classifier

    monkeypatch.setenv(var, "1")
    monkeypatch.setattr(backbones, "reachable", lambda *a, **k: pytest.fail("probed the network while offline"))
    with pytest.raises(ConfigError, match=rf"^backbone resnet18: .* downloads are turned off \({var}=1\); "):
        create_classifier("resnet18", pretrained=True)


def test_the_probe_is_bounded_in_time(monkeypatch):
    """A port nobody listens on (loopback only: no network in tests) answers no, within the timeout."""
    from frugalseg.models.backbones import reachable

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    assert not reachable("http://127.0.0.1:9/", timeout=1.0)
    assert time.perf_counter() - start < 2


def test_cached_weights_load_without_the_network(empty_caches, monkeypatch):
    """Weights timm downloaded earlier (Hugging Face cache layout) are used directly: no probe, no download."""
    import timm
    from safetensors.torch import save_file
    from timm.models import get_pretrained_cfg

    from frugalseg.models import backbones
    from frugalseg.models.backbones import create_backbone

    name = "resnet10t"
    cfg = get_pretrained_cfg(name)
    repo = empty_caches / "hf" / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    torch.manual_seed(0)
    weights = timm.create_model(name, pretrained=False).state_dict()
    save_file(weights, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    monkeypatch.setenv("FRUGALSEG_OFFLINE", "1")
    monkeypatch.setattr(backbones, "reachable", lambda *a, **k: pytest.fail("probed the network"))
    bb = create_backbone(name, pretrained=True)
    assert torch.equal(bb.model.state_dict()["conv1.0.weight"], weights["conv1.0.weight"])
