from __future__ import annotations

from pathlib import Path
from typing import Any

from microvm_run.plan import RunOptions, build_plan
from microvm_run.qemu import Accel, QemuInputs, qemu_argv
from microvm_run.spec import Spec, parse_spec

from .conftest import make_facts


def _pairs(argv: tuple[str, ...], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_microvm_machine_uses_mmio_devices_and_modern_virtio(spec: Spec) -> None:
    argv = build_plan(spec, RunOptions(), make_facts()).qemu_argv
    assert argv[0] == "/nix/store/q-qemu/bin/qemu-system-x86_64"
    assert _pairs(argv, "-machine") == ["microvm,accel=kvm,memory-backend=mem"]
    assert "virtio-mmio.force-legacy=false" in _pairs(argv, "-global")
    devices = _pairs(argv, "-device")
    assert "vhost-user-fs-device,chardev=fs1,tag=work" in devices
    assert "virtio-net-device,netdev=net0" in devices
    assert not any(d.endswith("-pci") or "-pci," in d for d in devices)


def test_q35_machine_uses_pci_devices(sample: dict[str, Any]) -> None:
    sample["guest"]["machine"] = "q35"
    spec = parse_spec(sample, Path("/s.toml"))
    argv = build_plan(spec, RunOptions(), make_facts()).qemu_argv
    devices = _pairs(argv, "-device")
    assert "vhost-user-fs-pci,chardev=fs1,tag=work" in devices
    assert "virtio-serial-pci" in devices
    assert "-global" not in argv


def test_shared_memfd_backs_all_guest_memory(spec: Spec) -> None:
    argv = build_plan(spec, RunOptions(memory_mib=512), make_facts()).qemu_argv
    assert _pairs(argv, "-object") == ["memory-backend-memfd,id=mem,size=512M,share=on"]
    assert _pairs(argv, "-m") == ["512M"]


def test_console_is_virtio_and_ctrl_c_goes_to_the_guest(spec: Spec) -> None:
    argv = build_plan(spec, RunOptions(), make_facts()).qemu_argv
    assert "stdio,id=console,signal=off" in _pairs(argv, "-chardev")
    assert "virtconsole,chardev=console" in _pairs(argv, "-device")
    assert "-serial" not in argv


def test_kernel_params_add_the_contract_and_tcg_workaround(spec: Spec) -> None:
    kvm = _pairs(build_plan(spec, RunOptions(), make_facts()).qemu_argv, "-append")[0]
    assert kvm == "init=/nix/store/t-toplevel/init console=hvc0 panic=-1"
    tcg = _pairs(build_plan(spec, RunOptions(accel="tcg"), make_facts()).qemu_argv, "-append")[0]
    assert tcg.endswith("tsc_early_khz=2000000 tsc=reliable")  # the host's TSC is unknown


def test_under_tcg_the_guest_is_told_the_hosts_tsc_frequency(spec: Spec) -> None:
    facts = make_facts(tsc_khz=2_595_996)
    tcg = _pairs(build_plan(spec, RunOptions(accel="tcg"), facts).qemu_argv, "-append")[0]
    assert tcg.split()[-2:] == ["tsc_early_khz=2595996", "tsc=reliable"]
    # KVM gives the guest a calibrated TSC of its own: no parameter.
    kvm = _pairs(build_plan(spec, RunOptions(), facts).qemu_argv, "-append")[0]
    assert "tsc" not in kvm


def test_cpu_model_follows_the_accelerator(spec: Spec) -> None:
    assert _pairs(build_plan(spec, RunOptions(), make_facts()).qemu_argv, "-cpu") == ["host"]
    tcg = build_plan(spec, RunOptions(accel="tcg"), make_facts()).qemu_argv
    assert _pairs(tcg, "-cpu") == ["max"]


def test_net_none_has_no_network_device(spec: Spec) -> None:
    argv = build_plan(spec, RunOptions(net="none"), make_facts()).qemu_argv
    assert "-netdev" not in argv
    assert not any("virtio-net" in arg for arg in argv)


def test_status_port_qmp_and_fw_cfg_point_into_the_runtime_dir(spec: Spec) -> None:
    argv = build_plan(spec, RunOptions(), make_facts()).qemu_argv
    run = "/run/user/1000/microvm-run/deadbeef"
    assert f"socket,id=status,path={run}/status.sock" in _pairs(argv, "-chardev")
    assert _pairs(argv, "-qmp") == [f"unix:{run}/qmp.sock,server=on,wait=off"]
    assert _pairs(argv, "-fw_cfg") == [
        f"name=opt/org.agent-microvm/launch,file={run}/launch.sh",
        f"name=opt/io.systemd.credentials/ANTHROPIC_API_KEY,file={run}/credentials/ANTHROPIC_API_KEY",
    ]
    assert not any("sk-secret" in arg for arg in argv)


def _inputs(netdev: str | None) -> QemuInputs:
    return QemuInputs(
        accel=Accel.KVM, memory_mib=512, vcpus=1, netdev=netdev, name="vm", fs_sockets=[],
        status_socket=Path("/r/status.sock"), qmp_socket=Path("/r/qmp.sock"),
        launch_file=Path("/r/launch.sh"), credential_files=[],
    )  # fmt: skip


def test_netdev_value_is_passed_through_as_one_argument(spec: Spec) -> None:
    value = "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:53-cmd:/a,,b 53 /s"
    argv = qemu_argv(spec, _inputs(value))
    assert _pairs(tuple(argv), "-netdev") == [value]
    assert "virtio-net-device,netdev=net0" in _pairs(tuple(argv), "-device")
    argv = qemu_argv(spec, _inputs(None))
    assert "-netdev" not in argv
    assert not any("virtio-net" in arg for arg in argv)


def test_q35_network_device_is_pci(sample: dict[str, Any]) -> None:
    sample["guest"]["machine"] = "q35"
    spec = parse_spec(sample, Path("/s.toml"))
    argv = qemu_argv(spec, _inputs("user,id=net0,restrict=on"))
    assert "virtio-net-pci,netdev=net0" in _pairs(tuple(argv), "-device")


def test_default_network_is_restricted_user_networking(spec: Spec) -> None:
    argv = build_plan(spec, RunOptions(), make_facts()).qemu_argv
    (value,) = _pairs(argv, "-netdev")
    assert value.startswith("user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:53-cmd:")
    assert "hostfwd" not in value
    plan = build_plan(spec, RunOptions(ports=("8080:80",)), make_facts())
    (value,) = _pairs(plan.qemu_argv, "-netdev")
    assert value.endswith(",hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80")
