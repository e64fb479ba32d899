"""A PyTorch / numpy + PIL reference of Deep3DFaceRecon's regressor and input alignment, for the
E-FID parity tests.

Written from reading sicxu/Deep3DFaceRecon_pytorch: models/networks.py (`ReconNetWrapper`, their
copy of torchvision's `ResNet` / `Bottleneck`, `conv1x1` / `conv3x3`), util/preprocess.py
(`POS`, `resize_n_crop_img`, `align_img`) and test.py (`read_data`). The same module tree and
attribute names, so `state_dict()` has the keys of `epoch_20.pth`'s "net_recon" entry. Upstream
hard-codes ResNet-50's widths; here they come from a `Face3DConfig` so that a tiny model can be
built (torchvision's `inplanes` = the stem width). Eval mode only. The alignment keeps upstream's
arithmetic (one 10x8 least-squares system, astype(int32) truncation, PIL bicubic resize then
crop); the standard 3D points are the 8-digit numbers printed in public code.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

# load_lm3d()'s 5 points as public code prints them (8 significant digits).
LM3D_STD = np.array([[-0.31148657, 0.29036078, 0.13377953],
                     [0.30979887, 0.28972036, 0.13179526],
                     [0.0032535, -0.04617932, 0.55244243],
                     [-0.25216928, -0.38133916, 0.22405732],
                     [0.2484662, -0.38128236, 0.22235769]], dtype=np.float32)


def conv1x1(in_planes, out_planes, stride=1, bias=False):
  return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=bias)


def conv3x3(in_planes, out_planes, stride=1):
  return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = conv1x1(inplanes, planes)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = conv1x1(planes, planes * self.expansion)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):
  """Their `ResNet(Bottleneck, layers, use_last_fc=False)`: no fc."""

  def __init__(self, layers, widths, inplanes=64):
    super().__init__()
    self.inplanes = inplanes
    self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(self.inplanes)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    for index, (blocks, planes) in enumerate(zip(layers, widths)):
      self.add_module(f"layer{index + 1}",
                      self._make_layer(planes, blocks, stride=1 if index == 0 else 2))
    self.num_layers = len(layers)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def _make_layer(self, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
      downsample = nn.Sequential(conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                                 nn.BatchNorm2d(planes * Bottleneck.expansion))
    layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * Bottleneck.expansion
    layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for index in range(self.num_layers):
      x = getattr(self, f"layer{index + 1}")(x)
    return self.avgpool(x)


class ReconNetWrapper(nn.Module):
  """`ReconNetWrapper(net_recon, use_last_fc=False)`: backbone + seven 1x1 coefficient convs."""

  fc_dim = 257

  def __init__(self, config):
    super().__init__()
    self.use_last_fc = False
    self.backbone = ResNet(config.stage_blocks, config.stage_widths, config.stem_channels)
    last_dim = config.stage_widths[-1] * Bottleneck.expansion
    self.final_layers = nn.ModuleList([conv1x1(last_dim, dim, bias=True)
                                       for dim in config.coefficient_dims])

  def forward(self, x):
    x = self.backbone(x)
    output = [layer(x) for layer in self.final_layers]
    return torch.flatten(torch.cat(output, dim=1), 1)


def random_recon_net(config, seed: int = 0) -> ReconNetWrapper:
  """Random weights (upstream's kaiming init; heads random, not upstream's zeros), BatchNorm
  affine and running statistics perturbed so they matter; eval mode."""
  torch.manual_seed(seed)
  model = ReconNetWrapper(config)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        n = module.num_features
        module.weight.copy_(1 + 0.2 * torch.randn(n))
        module.bias.copy_(0.2 * torch.randn(n))
        module.running_mean.copy_(0.2 * torch.randn(n))
        module.running_var.copy_(0.5 + torch.rand(n))
        module.num_batches_tracked.fill_(7)
    for layer in model.final_layers:
      layer.weight.normal_(0, 0.05)
      layer.bias.normal_(0, 0.1)
  return model.eval()


# ----------------------------------------------------------------------------------------------
# util/preprocess.py and test.py
# ----------------------------------------------------------------------------------------------


def POS(xp, x):  # noqa: N802, N803  (upstream's names)
  """Least squares xp (2, n) ~ [R1; R2] x (3, n) + t, as one 2n x 8 system -> t (2, 1), s."""
  npts = xp.shape[1]
  A = np.zeros([2 * npts, 8])  # noqa: N806
  A[0::2, 0:3] = x.transpose()
  A[0::2, 3] = 1
  A[1::2, 4:7] = x.transpose()
  A[1::2, 7] = 1
  b = np.reshape(xp.transpose(), [2 * npts, 1])
  k = np.linalg.lstsq(A, b, rcond=None)[0]
  s = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
  t = np.stack([k[3], k[7]], axis=0)
  return t, s


def resize_n_crop_img(img, t, s, target_size=224.0):
  w0, h0 = img.size
  w = (w0 * s).astype(np.int32)
  h = (h0 * s).astype(np.int32)
  left = (w / 2 - target_size / 2 + ((t[0] - w0 / 2) * s).item()).astype(np.int32)
  up = (h / 2 - target_size / 2 + ((h0 / 2 - t[1]) * s).item()).astype(np.int32)
  img = img.resize((w, h), resample=Image.Resampling.BICUBIC)
  return img.crop((left, up, left + target_size, up + target_size))


def align_img(img, lm, lm3D, target_size=224.0, rescale_factor=102.0):  # noqa: N803
  t, s = POS(lm.transpose(), lm3D.transpose())
  s = rescale_factor / s
  return resize_n_crop_img(img, t, s, target_size=target_size)


def read_data(image: np.ndarray, lm: np.ndarray, lm3d_std: np.ndarray = LM3D_STD,
              target_size=224.0, rescale_factor=102.0) -> np.ndarray:
  """test.py's `read_data` on an in-memory RGB frame and its 5 detector points (pixel indices,
  y down, upstream's order) -> the (1, 3, s, s) float32 tensor the network reads, as numpy."""
  im = Image.fromarray(image)
  _, H = im.size  # noqa: N806
  lm = np.array(lm, dtype=np.float32).reshape([-1, 2])
  lm[:, -1] = H - 1 - lm[:, -1]
  im = align_img(im, lm, lm3d_std, target_size, rescale_factor)
  return torch.tensor(np.array(im) / 255.0, dtype=torch.float32).permute(2, 0, 1)[None].numpy()
