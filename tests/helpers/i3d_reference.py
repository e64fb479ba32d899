"""A PyTorch reference of FVD's Kinetics-400 I3D (`i3d_torchscript.pt`) for parity tests.

Written from reading piergiaj/pytorch-i3d (`InceptionI3d`, `Unit3D`, `MaxPool3dSamePadding` in
pytorch_i3d.py; VideoGPT's copy in JunyaoHu/common_metrics_on_video_quality) for the module tree
and attribute names, so that its `state_dict()` has the keys we assume the TorchScript archive
has, and from universome/stylegan-v (frechet_video_distance.py, metric_utils.py) and
universome/fvd-comparison for `forward(x, rescale, resize, return_features)`. Unlike piergiaj's
code it is scriptable (the TF-SAME padding is integer arithmetic on the input's shape at every
call), so the tests `torch.jit.script` and `torch.jit.save` it and convert that archive. Widths
and the final pool window come from an `I3DConfig`, so a tiny network can be built. Eval only.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
  """TF "SAME" (piergiaj's compute_pad): (before, after), the smaller half before."""
  if size % stride == 0:
    total = max(kernel - stride, 0)
  else:
    total = max(kernel - size % stride, 0)
  return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: List[int], stride: List[int]) -> torch.Tensor:
  t_lo, t_hi = same_padding(x.shape[2], kernel[0], stride[0])
  h_lo, h_hi = same_padding(x.shape[3], kernel[1], stride[1])
  w_lo, w_hi = same_padding(x.shape[4], kernel[2], stride[2])
  return F.pad(x, [w_lo, w_hi, h_lo, h_hi, t_lo, t_hi])


class MaxPool3dSamePadding(nn.Module):
  """Zero padding as piergiaj (every input here is a ReLU output, so -inf would agree)."""

  def __init__(self, kernel_size: List[int], stride: List[int]):
    super().__init__()
    self.kernel_size = kernel_size
    self.stride = stride

  def forward(self, x):
    return F.max_pool3d(_pad_same(x, self.kernel_size, self.stride), self.kernel_size,
                        self.stride)


class Unit3D(nn.Module):
  def __init__(self, in_channels: int, output_channels: int, kernel_shape: List[int],
               stride: List[int] = (1, 1, 1), use_batch_norm: bool = True,
               use_bias: bool = False, activation: bool = True, eps: float = 1e-3):
    super().__init__()
    self.kernel_shape = list(kernel_shape)
    self.stride = list(stride)
    self.activation = activation
    self.conv3d = nn.Conv3d(in_channels, output_channels, self.kernel_shape, self.stride,
                            padding=0, bias=use_bias)
    # piergiaj: eps=0.001, momentum=0.01; no norm on the logits (Identity holds no state).
    self.bn = (nn.BatchNorm3d(output_channels, eps=eps, momentum=0.01) if use_batch_norm
               else nn.Identity())

  def forward(self, x):
    x = self.bn(self.conv3d(_pad_same(x, self.kernel_shape, self.stride)))
    return F.relu(x) if self.activation else x


class InceptionModule(nn.Module):
  def __init__(self, in_channels: int, out_channels: List[int], eps: float):
    super().__init__()
    self.b0 = Unit3D(in_channels, out_channels[0], [1, 1, 1], eps=eps)
    self.b1a = Unit3D(in_channels, out_channels[1], [1, 1, 1], eps=eps)
    self.b1b = Unit3D(out_channels[1], out_channels[2], [3, 3, 3], eps=eps)
    self.b2a = Unit3D(in_channels, out_channels[3], [1, 1, 1], eps=eps)
    self.b2b = Unit3D(out_channels[3], out_channels[4], [3, 3, 3], eps=eps)
    self.b3a = MaxPool3dSamePadding([3, 3, 3], [1, 1, 1])
    self.b3b = Unit3D(in_channels, out_channels[5], [1, 1, 1], eps=eps)

  def forward(self, x):
    return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                      self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
  """piergiaj's module tree; forward as the StyleGAN-V detector is called."""

  def __init__(self, config, input_size: Tuple[int, int] = (224, 224)):
    super().__init__()
    c, eps = config, config.batch_norm_epsilon
    self.input_size = [int(input_size[0]), int(input_size[1])]  # the `resize` target
    self.Conv3d_1a_7x7 = Unit3D(c.in_channels, c.stem_channels, [7, 7, 7], [2, 2, 2], eps=eps)
    self.MaxPool3d_2a_3x3 = MaxPool3dSamePadding([1, 3, 3], [1, 2, 2])
    self.Conv3d_2b_1x1 = Unit3D(c.stem_channels, c.stem_channels, [1, 1, 1], eps=eps)
    self.Conv3d_2c_3x3 = Unit3D(c.stem_channels, c.conv2c_channels, [3, 3, 3], eps=eps)
    self.MaxPool3d_3a_3x3 = MaxPool3dSamePadding([1, 3, 3], [1, 2, 2])
    widths_in = c.mixed_in_channels()
    mixed = [InceptionModule(w, list(m), eps) for w, m in zip(widths_in, c.mixed_channels)]
    self.Mixed_3b, self.Mixed_3c = mixed[0], mixed[1]
    self.MaxPool3d_4a_3x3 = MaxPool3dSamePadding([3, 3, 3], [2, 2, 2])
    self.Mixed_4b, self.Mixed_4c, self.Mixed_4d, self.Mixed_4e, self.Mixed_4f = mixed[2:7]
    self.MaxPool3d_5a_2x2 = MaxPool3dSamePadding([2, 2, 2], [2, 2, 2])
    self.Mixed_5b, self.Mixed_5c = mixed[7], mixed[8]
    self.avg_pool = nn.AvgPool3d(list(c.pool_window), stride=(1, 1, 1))
    self.dropout = nn.Dropout(0.5)
    self.logits = Unit3D(c.feature_channels, c.num_classes, [1, 1, 1], use_batch_norm=False,
                         use_bias=True, activation=False)

  def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
              return_features: bool = False) -> torch.Tensor:
    """x: (b, 3, t, h, w); [0, 255] with rescale, else [-1, 1]. Returns (b, 400): the logits
    averaged over time with return_features, else their softmax."""
    if rescale:
      x = x.float() / 255.0 * 2.0 - 1.0
    if resize:
      b, c, t, h, w = x.shape
      frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
      frames = F.interpolate(frames, size=self.input_size, mode="bilinear",
                             align_corners=False)
      x = frames.reshape(b, t, c, self.input_size[0], self.input_size[1]).permute(0, 2, 1, 3, 4)
    x = self.MaxPool3d_2a_3x3(self.Conv3d_1a_7x7(x))
    x = self.MaxPool3d_3a_3x3(self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x)))
    x = self.MaxPool3d_4a_3x3(self.Mixed_3c(self.Mixed_3b(x)))
    x = self.Mixed_4f(self.Mixed_4e(self.Mixed_4d(self.Mixed_4c(self.Mixed_4b(x)))))
    x = self.Mixed_5c(self.Mixed_5b(self.MaxPool3d_5a_2x2(x)))
    logits = self.logits(self.dropout(self.avg_pool(x)))   # (b, classes, t', 1, 1)
    logits = logits.squeeze(4).squeeze(3).mean(dim=2)
    if return_features:
      return logits
    return F.softmax(logits, dim=1)


def random_i3d(config, input_size=(224, 224), seed: int = 0) -> InceptionI3d:
  """Random weights; BatchNorm affine and running statistics perturbed so they matter; eval."""
  torch.manual_seed(seed)
  model = InceptionI3d(config, input_size)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm3d):
        n = module.num_features
        module.weight.copy_(1 + 0.2 * torch.randn(n))
        module.bias.copy_(0.2 * torch.randn(n))
        module.running_mean.copy_(0.2 * torch.randn(n))
        module.running_var.copy_(0.5 + torch.rand(n))
        module.num_batches_tracked.fill_(7)
  return model.eval()


def center_crop_reference(frames: torch.Tensor, size: int) -> torch.Tensor:
  """VideoGPT's / MCVD's `preprocess_single` for a batch: uint8 (b, t, h, w, c) -> float
  (b, c, t, size, size) in [-1, 1] (shorter side resized to `size`, centre crop)."""
  out = []
  for video in frames:
    video = video.permute(0, 3, 1, 2).float() / 255.0     # t c h w
    h, w = video.shape[-2:]
    scale = size / min(h, w)
    target = (size, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), size)
    video = F.interpolate(video, size=target, mode="bilinear", align_corners=False)
    h, w = video.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    video = video[:, :, top:top + size, left:left + size].permute(1, 0, 2, 3)
    out.append((video - 0.5) * 2)
  return torch.stack(out)
