"""QEMU command lines, built from the spec (no patching of generated scripts)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from microvm_run.contract import (
    CREDENTIAL_FW_CFG_PREFIX,
    FALLBACK_TSC_KHZ,
    LAUNCH_FW_CFG,
    LOCAL_DISK_SERIAL,
    RUNNER_KERNEL_PARAMS,
    STATUS_PORT,
    TCG_MICROVM_EXTRA_PARAMS,
    TCG_MICROVM_TSC_PARAM,
)

TYPE_CHECKING = False  # typing's, without importing typing (3 ms): see tests/unit/test_startup.py
if TYPE_CHECKING:
    # Annotations only: `ps` and `doctor`'s parser import Accel without the spec parser.
    from microvm_run.spec import Spec


class Accel(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


# Device model per machine: microvm has no PCI bus, only virtio-mmio.
_DEVICE_SUFFIX = {"microvm": "device", "q35": "pci"}


@dataclass(frozen=True)
class QemuInputs:
    """Everything the argv depends on besides the spec."""

    accel: Accel
    memory_mib: int
    vcpus: int
    netdev: str | None  # QEMU -netdev value; None: no network device
    name: str
    fs_sockets: Sequence[tuple[str, Path]]  # (tag, vhost-user socket)
    status_socket: Path
    qmp_socket: Path
    launch_file: Path
    credential_files: Sequence[tuple[str, Path]]  # (VAR, file)
    tsc_khz: int | None = None  # the host's TSC frequency, if known
    local_image: Path | None = None  # the local-directories disk (localdirs.py)


def kernel_params(spec: Spec, accel: Accel, tsc_khz: int | None = None) -> list[str]:
    params = [*spec.kernel_params, *RUNNER_KERNEL_PARAMS]
    if accel == Accel.TCG and spec.machine == "microvm":
        params.append(f"{TCG_MICROVM_TSC_PARAM}={tsc_khz or FALLBACK_TSC_KHZ}")
        params += TCG_MICROVM_EXTRA_PARAMS
    return params


def qemu_argv(spec: Spec, inputs: QemuInputs) -> list[str]:
    dev = _DEVICE_SUFFIX[spec.machine]
    machine = f"{spec.machine},accel={inputs.accel},memory-backend=mem"
    argv = [
        str(spec.qemu),
        "-name", inputs.name,
        "-machine", machine,
        "-cpu", "host" if inputs.accel == Accel.KVM else "max",
        "-m", f"{inputs.memory_mib}M",
        "-smp", str(inputs.vcpus),
        # vhost-user-fs needs guest RAM that virtiofsd can map: shared memfd.
        "-object", f"memory-backend-memfd,id=mem,size={inputs.memory_mib}M,share=on",
        "-nodefaults", "-no-user-config", "-nographic",
        # A guest reboot (panic=-1 turns a panic into one) ends QEMU instead.
        "-no-reboot",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", " ".join(kernel_params(spec, inputs.accel, inputs.tsc_khz)),
        # The agent's terminal: a virtio console, not an emulated UART, so
        # TUIs do not flicker; signal=off hands Ctrl-C to the agent.
        "-device", f"virtio-serial-{dev}",
        "-chardev", "stdio,id=console,signal=off",
        "-device", "virtconsole,chardev=console",
        # The guest reports ready / exit N here; the runner listens.
        "-chardev", f"socket,id=status,path={inputs.status_socket}",
        "-device", f"virtserialport,chardev=status,name={STATUS_PORT}",
        "-qmp", f"unix:{inputs.qmp_socket},server=on,wait=off",
        "-device", f"virtio-rng-{dev}",
        # Free page reporting: pages the guest frees go back to the host, so
        # an idle guest with 8 GiB does not pin 8 GiB of host memory.
        "-device", f"virtio-balloon-{dev},free-page-reporting=on",
        "-fw_cfg", f"name={LAUNCH_FW_CFG},file={inputs.launch_file}",
    ]  # fmt: skip
    for var, path in inputs.credential_files:
        argv += ["-fw_cfg", f"name={CREDENTIAL_FW_CFG_PREFIX}{var},file={path}"]
    if spec.machine == "microvm":
        # libvhost-user based daemons refuse legacy virtio-mmio devices.
        argv += ["-global", "virtio-mmio.force-legacy=false"]
    for index, (tag, socket) in enumerate(inputs.fs_sockets):
        argv += [
            "-chardev", f"socket,id=fs{index},path={socket}",
            "-device", f"vhost-user-fs-{dev},chardev=fs{index},tag={tag}",
        ]  # fmt: skip
    if inputs.local_image is not None:
        argv += [
            # Raw and sparse; discard=unmap gives deleted blocks back to the host.
            "-drive", f"file={inputs.local_image},if=none,id=local,format=raw,discard=unmap",
            "-device", f"virtio-blk-{dev},drive=local,serial={LOCAL_DISK_SERIAL}",
        ]  # fmt: skip
    if inputs.netdev is not None:
        argv += ["-netdev", inputs.netdev, "-device", f"virtio-net-{dev},netdev=net0"]
    return argv
