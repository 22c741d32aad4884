"""Known GPUs: memory, dense bf16 peak, and the bandwidths collectives typically reach.

Memory is what `torch.cuda.get_device_properties(0).total_memory` reports. The peak is the one
MFU uses in training (marjara.train.metrics.GPU_PEAK_TFLOPS). Bandwidths are per GPU, in GB/s of
NCCL "bus bandwidth" a well-configured node reaches in practice, not link maxima: intra-node over
NVLink (or PCIe where there is none), inter-node over the GPU's share of the network (8 x 400 Gb/s
InfiniBand/RoCE per H100/H200 node, 8 x 200 Gb/s per A100 node, a 100 Gb/s Ethernet per PCIe
node). Every figure can be overridden on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from marjara.errors import MarjaraError
from marjara.train.metrics import GPU_PEAK_TFLOPS

GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    peak_tflops: float
    intra_node_gbps: float
    inter_node_gbps: float

    def with_overrides(self, memory_gib=None, peak_tflops=None, intra_node_gbps=None, inter_node_gbps=None) -> "Device":
        given = dict(memory_gib=memory_gib, peak_tflops=peak_tflops, intra_node_gbps=intra_node_gbps,
                     inter_node_gbps=inter_node_gbps)
        return replace(self, **{key: value for key, value in given.items() if value is not None})


def _device(name: str, memory_gib: float, peak_key: str, intra: float, inter: float) -> Device:
    return Device(name, memory_gib, GPU_PEAK_TFLOPS[peak_key], intra, inter)


DEVICES: dict[str, Device] = {d.name: d for d in (
    _device("H200", 139.8, "H200", 360.0, 45.0),      # NVLink 4 (450 GB/s each way), 400 Gb/s NIC per GPU
    _device("H100", 79.1, "H100", 360.0, 45.0),       # SXM 80 GB
    _device("A100", 79.2, "A100", 230.0, 22.0),       # SXM 80 GB, NVLink 3 (300 GB/s each way), 200 Gb/s NIC per GPU
    _device("A100-40GB", 39.4, "A100", 230.0, 22.0),
    _device("L40S", 44.4, "L40S", 20.0, 1.5),         # PCIe 4.0, no NVLink; 100 Gb/s shared by 8 GPUs
    _device("A10G", 22.0, "A10G", 10.0, 1.5),         # PCIe 4.0 (AWS g5), 100 Gb/s shared by 8 GPUs
    _device("4090", 23.6, "4090", 20.0, 1.2),         # PCIe 4.0, 10 GbE
)}


def lookup(name: str) -> Device:
    for key, device in DEVICES.items():
        if key.lower() == name.lower():
            return device
    raise MarjaraError(f"unknown --gpu {name!r}; known: {', '.join(DEVICES)} "
                       "(or pick the closest and set --gpu_memory_gb, --peak_tflops, --intra_node_gbps, --inter_node_gbps)")
