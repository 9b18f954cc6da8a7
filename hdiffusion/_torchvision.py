"""Import torchvision on any torch build.

Some torchvision wheels (e.g. a CUDA build installed beside a CPU-only torch) register fake kernels for
`torchvision::nms`/`qnms` at import time and fail when their compiled ops did not load. Defining the two op
schemas first lets the pure-Python parts (datasets, utils) import; the detection ops stay unavailable.
"""

import torch

_schemas = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None


def import_torchvision():
    global _library
    try:
        import torchvision
        return torchvision
    except RuntimeError:
        pass
    if _library is None:
        _library = torch.library.Library("torchvision", "FRAGMENT")
        for name, schema in _schemas.items():
            try:
                torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
            except RuntimeError:
                _library.define(schema)
    import sys
    for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[module]
    import torchvision
    return torchvision
