"""A PyTorch reference of pytorch-fid's Inception-v3 for parity tests.

Written from reading torchvision's models/inception.py (`Inception3`, `BasicConv2d`,
`InceptionA`..`InceptionE`) and `mseitzer/pytorch-fid` v0.3.0 src/pytorch_fid/inception.py
(`fid_inception_v3()`, `FIDInceptionA`, `FIDInceptionC`, `FIDInceptionE_1`, `FIDInceptionE_2`,
`InceptionV3` with its `blocks`, resize and normalize): the same module tree and attribute names,
so `Inception3`'s `state_dict()` has the keys of `pt_inception-2015-12-05-6726825d.pth`.
torchvision cannot be imported here, hence the copy. Upstream hard-codes the widths; here each is
divided by the config's `width_divisor` so that a narrow network can be built. Eval mode only.
torchvision's own InceptionA / C / E forwards (average pools counting the padding) are left
out: the FID network runs only pytorch-fid's patched ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicConv2d(nn.Module):
  def __init__(self, in_channels, out_channels, **kwargs):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
    self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
  def __init__(self, in_channels, pool_features, div=1):
    super().__init__()
    self.branch1x1 = BasicConv2d(in_channels, 64 // div, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(in_channels, 48 // div, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48 // div, 64 // div, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64 // div, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64 // div, 96 // div, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96 // div, 96 // div, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)


class FIDInceptionA(InceptionA):
  def forward(self, x):
    branch1x1 = self.branch1x1(x)
    branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    # TensorFlow's average pool leaves the padded zeros out of the mean.
    branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    branch_pool = self.branch_pool(branch_pool)
    return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
  def __init__(self, in_channels, div=1):
    super().__init__()
    self.branch3x3 = BasicConv2d(in_channels, 384 // div, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64 // div, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64 // div, 96 // div, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96 // div, 96 // div, kernel_size=3, stride=2)

  def forward(self, x):
    branch3x3 = self.branch3x3(x)
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
    return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
  def __init__(self, in_channels, channels_7x7, div=1):
    super().__init__()
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_channels, 192 // div, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192 // div, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192 // div, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(in_channels, 192 // div, kernel_size=1)


class FIDInceptionC(InceptionC):
  def forward(self, x):
    branch1x1 = self.branch1x1(x)
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    branch7x7dbl = self.branch7x7dbl_1(x)
    branch7x7dbl = self.branch7x7dbl_2(branch7x7dbl)
    branch7x7dbl = self.branch7x7dbl_3(branch7x7dbl)
    branch7x7dbl = self.branch7x7dbl_4(branch7x7dbl)
    branch7x7dbl = self.branch7x7dbl_5(branch7x7dbl)
    branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    branch_pool = self.branch_pool(branch_pool)
    return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
  def __init__(self, in_channels, div=1):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(in_channels, 192 // div, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192 // div, 320 // div, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192 // div, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192 // div, 192 // div, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192 // div, 192 // div, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192 // div, 192 // div, kernel_size=3, stride=2)

  def forward(self, x):
    branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
    branch7x7x3 = self.branch7x7x3_1(x)
    branch7x7x3 = self.branch7x7x3_2(branch7x7x3)
    branch7x7x3 = self.branch7x7x3_3(branch7x7x3)
    branch7x7x3 = self.branch7x7x3_4(branch7x7x3)
    branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
    return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(nn.Module):
  def __init__(self, in_channels, div=1):
    super().__init__()
    self.branch1x1 = BasicConv2d(in_channels, 320 // div, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(in_channels, 384 // div, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384 // div, 384 // div, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384 // div, 384 // div, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448 // div, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448 // div, 384 // div, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384 // div, 384 // div, kernel_size=(1, 3),
                                       padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384 // div, 384 // div, kernel_size=(3, 1),
                                       padding=(1, 0))
    self.branch_pool = BasicConv2d(in_channels, 192 // div, kernel_size=1)

  def _branches(self, x):
    branch1x1 = self.branch1x1(x)
    branch3x3 = self.branch3x3_1(x)
    branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl),
                              self.branch3x3dbl_3b(branch3x3dbl)], 1)
    return branch1x1, branch3x3, branch3x3dbl


class FIDInceptionE_1(InceptionE):  # noqa: N801  (upstream's name)
  def forward(self, x):
    branch1x1, branch3x3, branch3x3dbl = self._branches(x)
    branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    branch_pool = self.branch_pool(branch_pool)
    return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionE_2(InceptionE):  # noqa: N801  (upstream's name)
  def forward(self, x):
    branch1x1, branch3x3, branch3x3dbl = self._branches(x)
    # The FID graph max-pools here where other Inception-v3s average.
    branch_pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    branch_pool = self.branch_pool(branch_pool)
    return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class Inception3(nn.Module):
  """torchvision's Inception3(num_classes, aux_logits=False) with the FID blocks swapped in, as
  `fid_inception_v3()` leaves it (its `forward`, the 1008-way classification, is not needed)."""

  def __init__(self, config):
    super().__init__()
    d = config.width_divisor
    self.aux_logits = False
    self.transform_input = False
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32 // d, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32 // d, 32 // d, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32 // d, 64 // d, kernel_size=3, padding=1)
    self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
    self.Conv2d_3b_1x1 = BasicConv2d(64 // d, 80 // d, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80 // d, 192 // d, kernel_size=3)
    self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
    self.Mixed_5b = FIDInceptionA(192 // d, 32 // d, d)
    self.Mixed_5c = FIDInceptionA(256 // d, 64 // d, d)
    self.Mixed_5d = FIDInceptionA(288 // d, 64 // d, d)
    self.Mixed_6a = InceptionB(288 // d, d)
    self.Mixed_6b = FIDInceptionC(768 // d, 128 // d, d)
    self.Mixed_6c = FIDInceptionC(768 // d, 160 // d, d)
    self.Mixed_6d = FIDInceptionC(768 // d, 160 // d, d)
    self.Mixed_6e = FIDInceptionC(768 // d, 192 // d, d)
    self.AuxLogits = None
    self.Mixed_7a = InceptionD(768 // d, d)
    self.Mixed_7b = FIDInceptionE_1(1280 // d, d)
    self.Mixed_7c = FIDInceptionE_2(2048 // d, d)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.dropout = nn.Dropout(p=0.5)
    self.fc = nn.Linear(2048 // d, config.num_classes)


class InceptionV3(nn.Module):
  """pytorch-fid's wrapper with output_blocks=(3,), resize_input and normalize_input on, built
  around a given trunk instead of downloading the weights."""

  def __init__(self, inception: Inception3, image_size: int = 299):
    super().__init__()
    self.image_size = image_size
    self.blocks = nn.ModuleList([
        nn.Sequential(inception.Conv2d_1a_3x3, inception.Conv2d_2a_3x3,
                      inception.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2)),
        nn.Sequential(inception.Conv2d_3b_1x1, inception.Conv2d_4a_3x3,
                      nn.MaxPool2d(kernel_size=3, stride=2)),
        nn.Sequential(inception.Mixed_5b, inception.Mixed_5c, inception.Mixed_5d,
                      inception.Mixed_6a, inception.Mixed_6b, inception.Mixed_6c,
                      inception.Mixed_6d, inception.Mixed_6e),
        nn.Sequential(inception.Mixed_7a, inception.Mixed_7b, inception.Mixed_7c,
                      nn.AdaptiveAvgPool2d(output_size=(1, 1))),
    ])

  def forward(self, inp):
    """(B, 3, H, W) in [0, 1] -> [pool3 features (B, 2048, 1, 1)], as upstream's list."""
    x = F.interpolate(inp, size=(self.image_size, self.image_size), mode="bilinear",
                      align_corners=False)
    x = 2 * x - 1
    for block in self.blocks:
      x = block(x)
    return [x]


def random_inception(config, seed: int = 0) -> Inception3:
  """Random weights and non-trivial BatchNorm statistics; eval mode.

  With random convs and arbitrary running statistics the activations would shrink towards the
  BatchNorm biases over ~20 layers and pool3 would hardly depend on the image. So the running
  statistics are first measured on random images (one training-mode pass, cumulative average),
  then perturbed, and the affine parameters randomised: every layer sees roughly normalised
  inputs that still differ from what its statistics say.
  """
  torch.manual_seed(seed)
  model = Inception3(config)
  norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  wrapper = InceptionV3(model, config.image_size)
  for norm in norms:
    norm.momentum = None  # the first batch's statistics, exactly
    norm.reset_running_stats()
  with torch.no_grad():
    wrapper.train()(torch.rand(4, 3, 96, 112))
    for norm in norms:
      n = norm.num_features
      norm.running_mean.add_(0.2 * torch.randn(n) * norm.running_var.sqrt())
      norm.running_var.mul_(0.5 + torch.rand(n))
      norm.weight.copy_(1 + 0.2 * torch.randn(n))
      norm.bias.copy_(0.2 * torch.randn(n))
      norm.num_batches_tracked.fill_(7)
      norm.momentum = 0.1
  return model.eval()
