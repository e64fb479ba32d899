"""A PyTorch reference of PD-FGC's motion encoder for parity tests.

Written from reading `Dorniwang/PD-FGC-inference` (`FanEncoder` in lib/models/networks/encoder.py,
`FAN_use` / `HourGlass` / `ConvBlock` in FAN_feature_extractor.py): the same module tree and
attribute names, so its `state_dict()` has `motion_model.pth`'s keys. Upstream hard-codes the
widths; here they come from a `PDFGCConfig` so that a tiny model can be built. Eval mode only
(the hourglass dropout is there, as upstream, and does nothing in eval).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Module):
  def __init__(self, in_planes: int, out_planes: int):
    super().__init__()
    half, quarter = out_planes // 2, out_planes // 4
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, half, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(half)
    self.conv2 = nn.Conv2d(half, quarter, 3, padding=1, bias=False)
    self.bn3 = nn.BatchNorm2d(quarter)
    self.conv3 = nn.Conv2d(quarter, quarter, 3, padding=1, bias=False)
    self.downsample = None
    if in_planes != out_planes:
      self.downsample = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(),
                                      nn.Conv2d(in_planes, out_planes, 1, bias=False))

  def forward(self, x):
    first = self.conv1(F.relu(self.bn1(x)))
    second = self.conv2(F.relu(self.bn2(first)))
    third = self.conv3(F.relu(self.bn3(second)))
    residual = x if self.downsample is None else self.downsample(x)
    return torch.cat([first, second, third], 1) + residual


class HourGlass(nn.Module):
  def __init__(self, num_modules: int, depth: int, num_features: int):
    super().__init__()
    self.num_modules, self.depth, self.features = num_modules, depth, num_features
    self.dropout = nn.Dropout(0.5)
    for level in range(depth, 0, -1):  # registration order as upstream's recursion
      self.add_module(f"b1_{level}", ConvBlock(num_features, num_features))
      self.add_module(f"b2_{level}", ConvBlock(num_features, num_features))
      if level == 1:
        self.add_module(f"b2_plus_{level}", ConvBlock(num_features, num_features))
    for level in range(1, depth + 1):
      self.add_module(f"b3_{level}", ConvBlock(num_features, num_features))

  def _forward(self, level, inp):
    upper = self.dropout(self._modules[f"b1_{level}"](inp))
    lower = self._modules[f"b2_{level}"](F.max_pool2d(inp, 2, stride=2))
    if level > 1:
      lower = self._forward(level - 1, lower)
    else:
      lower = self._modules[f"b2_plus_{level}"](lower)
    lower = self._modules[f"b3_{level}"](lower)
    return upper + F.interpolate(lower, size=upper.shape[-2:], mode="bilinear",
                                 align_corners=False)

  def forward(self, x):
    return self._forward(self.depth, x)


class FAN_use(nn.Module):  # noqa: N801  (upstream's name)
  def __init__(self, config):
    super().__init__()
    c = config
    self.num_modules = 1
    self.conv1 = nn.Conv2d(c.in_channels, c.stem_channels, 7, stride=2, padding=3)
    self.bn1 = nn.BatchNorm2d(c.stem_channels)
    self.conv2 = ConvBlock(c.stem_channels, c.block_channels)
    self.conv3 = ConvBlock(c.block_channels, c.block_channels)
    self.conv4 = ConvBlock(c.block_channels, c.hourglass_channels)
    self.m0 = HourGlass(1, c.hourglass_depth, c.hourglass_channels)
    self.top_m_0 = ConvBlock(c.hourglass_channels, c.hourglass_channels)
    self.conv_last0 = nn.Conv2d(c.hourglass_channels, c.hourglass_channels, 1)
    self.l0 = nn.Conv2d(c.hourglass_channels, c.num_landmarks, 1)
    self.bn_end0 = nn.BatchNorm2d(c.hourglass_channels)
    self.avgpool = nn.MaxPool2d((2, 2), 2)  # unused upstream too; holds no weights
    self.conv6 = nn.Conv2d(c.num_landmarks, 1, 3, 2, 1)
    self.fc = nn.Linear(c.summary_size ** 2, c.feature_dim)
    self.bn5 = nn.BatchNorm2d(c.num_landmarks)
    self.relu = nn.ReLU()

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.max_pool2d(self.conv2(x), 2)
    x = self.conv4(self.conv3(x))
    x = self.top_m_0(self.m0(x))
    x = self.bn_end0(self.conv_last0(x))
    heatmaps = self.l0(F.relu(x))
    x = self.conv6(self.relu(self.bn5(heatmaps)))
    x = x.view(-1, x.shape[-2] * x.shape[-1])
    return self.fc(self.relu(x))


def _head(width):
  return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.BatchNorm1d(width),
                       nn.Linear(width, width))


class FanEncoder(nn.Module):
  def __init__(self, config):
    super().__init__()
    width = config.feature_dim
    self.model = FAN_use(config)
    self.to_mouth = _head(width)
    self.mouth_embed = nn.Sequential(nn.ReLU(), nn.Linear(width, config.mouth_embed_dim))
    self.to_headpose = _head(width)
    self.headpose_embed = nn.Sequential(nn.ReLU(), nn.Linear(width, config.pose_dim))
    self.to_eye = _head(width)
    self.eye_embed = nn.Sequential(nn.ReLU(), nn.Linear(width, config.eye_dim))
    self.to_emo = _head(width)
    self.emo_embed = nn.Sequential(nn.ReLU(), nn.Linear(width, config.expression_dim))

  def forward(self, x):
    """(pose, eye, emotion, mouth) as upstream."""
    x = self.model(x)
    mouth_feat = self.to_mouth(x)
    headpose_emb = self.headpose_embed(self.to_headpose(x))
    eye_embed = self.eye_embed(self.to_eye(x))
    emo_embed = self.emo_embed(self.to_emo(x))
    return headpose_emb, eye_embed, emo_embed, mouth_feat


def random_fan_encoder(config, seed: int = 0) -> FanEncoder:
  """Random weights, BatchNorm affine and running statistics perturbed so they matter; eval."""
  torch.manual_seed(seed)
  model = FanEncoder(config)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        n = module.num_features
        module.weight.copy_(1 + 0.2 * torch.randn(n))
        module.bias.copy_(0.2 * torch.randn(n))
        module.running_mean.copy_(0.2 * torch.randn(n))
        module.running_var.copy_(0.5 + torch.rand(n))
        module.num_batches_tracked.fill_(7)
  return model.eval()
