"""Declare torchvision's two C++ detection ops before torchvision is imported (loaded from a .pth).

The registry serves torchvision 0.28.0 only as a CUDA build; next to torch's CPU build its C++
extension does not load, and ``import torchvision`` then fails registering fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` (so vLLM's Qwen-VL processors fail to import).
Declaring the two schemas lets the import succeed; calling them still raises, and nothing on the
paths vLLM runs for Qwen3-VL calls them. The declarations match torchvision's own (csrc/ops/nms.cpp).
"""

import torch

try:
    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except RuntimeError:  # already defined: torchvision's extension loaded after all
    pass
