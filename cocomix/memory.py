"""
Device memory measured without the device: a step run on fake tensors (FakeTensorMode, which
allocates nothing) under PyTorch's MemTracker, which counts every tensor's storage as it is made
and freed. That gives the peak of a full-size step on a machine too small to hold it, for the
shapes a GPU would see.
"""

from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker


def traced_peak(fn, *modules_and_optimizers):
    """(peak bytes, {category: bytes at the peak}) of fn(), run on fake tensors. fn builds its own
    inputs (and may build models) inside; modules or optimizers made before the call and passed
    here are counted too (as parameters, gradients and optimizer state). The categories are
    MemTracker's: PARAM, BUFFER, GRAD, ACT (saved for the backward), TEMP, OPT, OTH. Every device's
    bytes are added up: the fake step runs on one."""
    tracker = MemTracker()
    if modules_and_optimizers:
        tracker.track_external(*modules_and_optimizers)
    with tracker:
        fn()
    peak = {}
    for per_device in tracker.get_tracker_snapshot("peak").values():
        for kind, n in per_device.items():
            name = str(kind).rsplit(".", 1)[-1]
            peak[name] = peak.get(name, 0) + n
    return peak.pop("Total", 0), peak


fake_tensors = (
    FakeTensorMode  # `with fake_tensors(): ...` builds models and inputs that take no memory
)
