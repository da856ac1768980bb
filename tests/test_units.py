"""Unit tests of stockade's own logic: limits, status decisions, schema, cgroup plumbing."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stockade import protocol
from stockade.limits import (
    BY_NAME,
    CEILING,
    FIELDS,
    FLOOR,
    LimitError,
    LimitPolicy,
    Limits,
    LimitsIn,
)
from stockade.result import KillReason, Outcome, Status, judge
from stockade.sandbox.cgroups import CgroupDriver, RunCgroup, parse_mountinfo

POLICY = LimitPolicy()


def test_limits_default_and_resolve() -> None:
    assert POLICY.resolve(None) == Limits()
    assert POLICY.resolve(LimitsIn(memory_mib=256, cpu_time_s=1)).memory_mib == 256


@pytest.mark.parametrize(("requested", "field"), [
    ({"memory_mib": 4096}, "memory_mib"), ({"memory_mib": 8}, "memory_mib"),
    ({"cpu_time_s": float("nan")}, "cpu_time_s"), ({"processes": 2.5}, "processes"),
    ({"processes": True}, "processes"), ({"wall_time_s": "1"}, "wall_time_s")])
def test_limits_refused_with_the_field_named(requested: dict[str, Any], field: str) -> None:
    with pytest.raises(LimitError) as info:
        POLICY.resolve(LimitsIn(**requested))
    assert info.value.field == field and field in info.value.message


def test_an_unknown_limit_is_refused_when_decoded() -> None:
    with pytest.raises(msgspec.ValidationError, match="bogus"):
        msgspec.convert({"bogus": 1}, LimitsIn)


def test_the_zygote_admits_only_limits_within_the_policy() -> None:
    assert POLICY.admit(Limits()) == Limits()
    with pytest.raises(LimitError) as info:
        POLICY.admit(Limits(memory_mib=4096))
    assert info.value.field == "memory_mib"


def test_each_limit_is_defined_once_with_its_unit_flag_and_range() -> None:
    assert [f.name for f in FIELDS] == list(Limits.__struct_fields__)
    assert list(LimitsIn.__struct_fields__) == list(Limits.__struct_fields__)
    memory = BY_NAME["memory_mib"]
    assert (memory.flag, memory.unit, memory.kind, memory.floor) == ("--memory", "MiB", int, 16)
    assert FLOOR.memory_mib == 16 and CEILING.cpu_time_s == 300.0


def test_policy_refuses_a_default_above_its_maximum() -> None:
    with pytest.raises(LimitError):
        LimitPolicy(default=Limits(memory_mib=512), maximum=Limits(memory_mib=256))


@pytest.mark.parametrize(("outcome", "over", "status"), [
    (Outcome(exit_code=0), False, Status.OK),
    (Outcome(exit_code=2), False, Status.RUNTIME_ERROR),
    (Outcome(signal=signal.SIGSEGV), False, Status.SIGNALED),
    (Outcome(signal=signal.SIGXFSZ), False, Status.FILE_SIZE_LIMIT),
    (Outcome(signal=signal.SIGXCPU), False, Status.TIME_LIMIT),
    (Outcome(signal=signal.SIGKILL, killed_for=KillReason.WALL_TIME), False,
     Status.WALL_TIME_LIMIT),
    (Outcome(signal=signal.SIGKILL, killed_for=KillReason.CPU_TIME), False, Status.TIME_LIMIT),
    (Outcome(exit_code=0, cpu_time_s=9.0), False, Status.TIME_LIMIT),
    (Outcome(signal=signal.SIGKILL, oom_killed=True), False, Status.MEMORY_LIMIT),
    (Outcome(signal=signal.SIGKILL, killed_for=KillReason.OUTPUT), True, Status.OUTPUT_LIMIT),
    (Outcome(exit_code=0), True, Status.OUTPUT_LIMIT),
    (Outcome(error="boom", oom_killed=True), False, Status.INTERNAL_ERROR),
])
def test_judge(outcome: Outcome, over: bool, status: Status) -> None:
    assert judge(outcome, Limits(), over)[0] == status


@pytest.mark.parametrize("name", [
    "", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "main.py", "x" * 256, "a\0b",
    "/".join("d" * 9)])
def test_unsafe_file_names_refused(name: str) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.check_file_name(name)


def test_payload_round_trip_and_caps() -> None:
    payload = protocol.Payload("print(1)", ["a"], [protocol.InputFile("d/x.csv", b"1")])
    assert protocol.decode_payload(protocol.encode_payload(payload)) == payload
    with pytest.raises(protocol.ProtocolError):
        protocol.encode_payload(protocol.Payload("", files=[
            protocol.InputFile(f"f{i}", b"") for i in range(protocol.MAX_FILES + 1)]))
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_payload(b"\x93\x01\x02")  # not a Payload


@pytest.mark.parametrize("raw", [
    b"", b"{", b'{"type": "start"}', b'{"type": "start", "limits": {}, "x": 1}',
    b'{"type": "exec", "limits": {}}', b'{"type": "start", "limits": {"memory_mib": "lots"}}',
    b"x" * (protocol.MAX_MESSAGE + 1)])
def test_client_messages_decoded_strictly(raw: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_client(raw)


MOUNTINFO_V1 = """\
30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
35 30 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
37 30 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
38 30 0:34 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_mountinfo_v1_with_combined_cpu_cpuacct() -> None:
    unified, v1 = parse_mountinfo(MOUNTINFO_V1)
    assert unified == Path("/sys/fs/cgroup/unified")
    assert v1 == {"memory": Path("/sys/fs/cgroup/memory"), "pids": Path("/sys/fs/cgroup/pids"),
                  "cpuacct": Path("/sys/fs/cgroup/cpu,cpuacct")}
    assert CgroupDriver("stockade", MOUNTINFO_V1).version == 1


def _fake_v2_tree(root: Path) -> str:
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    return f"40 23 0:40 / {root} rw,nosuid - cgroup2 cgroup2 rw\n"


def test_v2_zygote_leaves_a_root_it_must_delegate_from(tmp_path: Path) -> None:
    """On v2 a zygote that is a container's init sits in the cgroup it must delegate
    from; it moves into a leaf of its own (the kernel's EBUSY is not in a fake tree)."""
    driver = CgroupDriver("stockade/runs", _fake_v2_tree(tmp_path))
    driver.leave_delegation_root()
    assert (tmp_path / "stockade-zygote" / "cgroup.procs").read_text() == str(os.getpid())


def test_v2_driver_delegates_controllers_and_reads_run_figures(tmp_path: Path) -> None:
    driver = CgroupDriver("stockade/runs", _fake_v2_tree(tmp_path))
    assert driver.version == 2
    (tmp_path / "stockade" / "runs").mkdir(parents=True)
    for level in (tmp_path / "stockade", tmp_path / "stockade" / "runs"):
        (level / "cgroup.subtree_control").write_text("")
    driver.prepare()
    for level in (tmp_path, tmp_path / "stockade", tmp_path / "stockade" / "runs"):
        assert (level / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    run = driver.create("r1")
    directory = tmp_path / "stockade" / "runs" / "r1"
    for name, text in {"cpu.stat": "usage_usec 1000000\nuser_usec 1\n",
                       "memory.events": "low 0\noom_kill 0\n", "memory.peak": "0\n",
                       "memory.max": "max\n", "memory.swap.max": "max\n",
                       "memory.oom.group": "0\n", "pids.max": "max\n"}.items():
        (directory / name).write_text(text)
    run.set_memory_limit(64 << 20)
    run.set_pids_limit(9)
    assert (directory / "memory.max").read_text() == str(64 << 20)
    assert (directory / "memory.swap.max").read_text() == "0"
    assert (directory / "memory.oom.group").read_text() == "1"
    assert (directory / "pids.max").read_text() == "9"
    run.begin()
    (directory / "cpu.stat").write_text("usage_usec 1250000\n")
    (directory / "memory.events").write_text("oom_kill 1\n")
    (directory / "memory.peak").write_text(str(5 << 20))
    assert run.run_cpu_time_s() == pytest.approx(0.25)
    assert run.oom_killed()
    assert run.memory_peak_kib() == 5 * 1024


def test_no_usable_hierarchy_is_a_clear_error() -> None:
    with pytest.raises(Exception, match="no usable cgroup hierarchy"):
        CgroupDriver("stockade", "1 0 0:1 / / rw - ext4 /dev/vda rw\n")


def test_limits_struct_rejects_unknown_fields() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"memory": 1}', type=Limits)


def test_run_cgroup_lists_each_directory_once() -> None:
    shared = Path("/x")
    assert RunCgroup(2, {"memory": shared, "pids": shared, "cpu": shared}).procs_paths == [
        shared / "cgroup.procs"]


@pytest.mark.parametrize(("names", "conflict"), [
    (["a", "b", "c/d"], None), (["d/a", "d/b", "d/e/f"], None),
    (["a", "a"], 1), (["a", "a/b"], 1), (["a/b", "a"], 1), (["x/y/z", "x/y"], 1),
    (["x/y", "q", "x/y/z/w"], 2)])
def test_colliding_file_names_are_found(names: list[str], conflict: int | None) -> None:
    found = protocol.file_name_conflict(names)
    assert (found[0] if found else None) == conflict
    if conflict is not None:
        with pytest.raises(protocol.ProtocolError):
            protocol.check_file_names(names)
