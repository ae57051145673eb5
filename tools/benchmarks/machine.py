"""What the benchmark ran on: CPU model, cores, library versions, load average."""
import os
import platform
import time

import torch

from region_contrast.provenance import commit_description, cpu_model

from .common import REPO


def load_sample(started, label):
    """(seconds since start, label, 1-minute load, runnable tasks) from /proc/loadavg."""
    try:
        with open("/proc/loadavg") as f:
            fields = f.read().split()
        return [round(time.time() - started, 1), label, float(fields[0]),
                int(fields[3].split("/")[0])]
    except (OSError, ValueError, IndexError):
        return None


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def machine_info(device):
    import detectron2

    info = {
        "commit": commit_description(REPO),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else None),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "detectron2_version": getattr(detectron2, "__version__", "unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "device_name": cpu_model(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=torch.cuda.get_device_name(device),
            cuda_version=torch.version.cuda,
            cudnn_version=torch.backends.cudnn.version(),
            gpu_memory_bytes=props.total_memory,
            # TF32 matmuls round fp32 inputs to 10 mantissa bits: gradients then agree with a
            # float64 evaluation to ~1e-3, not ~1e-6.
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            tf32_override_env=os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"),
        )
    return info
