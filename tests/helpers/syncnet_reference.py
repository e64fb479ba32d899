"""A PyTorch reference of SyncNet v2 and of its evaluation arithmetic for parity tests.

Written from reading `joonson/syncnet_python` (commit 6efbb1c): `S` in SyncNetModel.py with the
same Sequentials and indices, so its `state_dict()` has `syncnet_v2.model`'s keys (widths and the
lip tower's last kernel come from a `SyncNetConfig`, so that a tiny model can be built);
`calc_pdist` and the body of `SyncNetInstance.evaluate` from its tensors on (upstream names,
without the ffmpeg / cv2 file handling and the prints); and the box arithmetic of
`run_pipeline.crop_video` on given boxes (cv2 for the resize, as upstream).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import signal
from torch import nn


class S(nn.Module):
  def __init__(self, config):
    super().__init__()
    a, lip = config.audio_channels, config.lip_channels
    final = config.lip_final_kernel
    self.netcnnaud = nn.Sequential(
        nn.Conv2d(1, a[0], kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)),
        nn.BatchNorm2d(a[0]), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=(1, 1), stride=(1, 1)),
        nn.Conv2d(a[0], a[1], kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)),
        nn.BatchNorm2d(a[1]), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=(3, 3), stride=(1, 2)),
        nn.Conv2d(a[1], a[2], kernel_size=(3, 3), padding=(1, 1)),
        nn.BatchNorm2d(a[2]), nn.ReLU(inplace=True),
        nn.Conv2d(a[2], a[3], kernel_size=(3, 3), padding=(1, 1)),
        nn.BatchNorm2d(a[3]), nn.ReLU(inplace=True),
        nn.Conv2d(a[3], a[4], kernel_size=(3, 3), padding=(1, 1)),
        nn.BatchNorm2d(a[4]), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2)),
        nn.Conv2d(a[4], a[5], kernel_size=(5, 4), padding=(0, 0)),
        nn.BatchNorm2d(a[5]), nn.ReLU())
    self.netfcaud = nn.Sequential(nn.Linear(a[5], config.hidden_dim),
                                  nn.BatchNorm1d(config.hidden_dim), nn.ReLU(),
                                  nn.Linear(config.hidden_dim, config.embed_dim))
    self.netfclip = nn.Sequential(nn.Linear(lip[5], config.hidden_dim),
                                  nn.BatchNorm1d(config.hidden_dim), nn.ReLU(),
                                  nn.Linear(config.hidden_dim, config.embed_dim))
    self.netcnnlip = nn.Sequential(
        nn.Conv3d(3, lip[0], kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=0),
        nn.BatchNorm3d(lip[0]), nn.ReLU(inplace=True),
        nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
        nn.Conv3d(lip[0], lip[1], kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),
        nn.BatchNorm3d(lip[1]), nn.ReLU(inplace=True),
        nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        nn.Conv3d(lip[1], lip[2], kernel_size=(1, 3, 3), padding=(0, 1, 1)),
        nn.BatchNorm3d(lip[2]), nn.ReLU(inplace=True),
        nn.Conv3d(lip[2], lip[3], kernel_size=(1, 3, 3), padding=(0, 1, 1)),
        nn.BatchNorm3d(lip[3]), nn.ReLU(inplace=True),
        nn.Conv3d(lip[3], lip[4], kernel_size=(1, 3, 3), padding=(0, 1, 1)),
        nn.BatchNorm3d(lip[4]), nn.ReLU(inplace=True),
        nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
        nn.Conv3d(lip[4], lip[5], kernel_size=(1, final, final), padding=0),
        nn.BatchNorm3d(lip[5]), nn.ReLU(inplace=True))

  def forward_aud(self, x):
    mid = self.netcnnaud(x)
    mid = mid.view((mid.size()[0], -1))
    return self.netfcaud(mid)

  def forward_lip(self, x):
    mid = self.netcnnlip(x)
    mid = mid.view((mid.size()[0], -1))
    return self.netfclip(mid)


def random_syncnet(config, seed: int = 0) -> S:
  """Random weights, BatchNorm affine and running statistics perturbed so they matter; eval."""
  torch.manual_seed(seed)
  model = S(config)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        n = module.num_features
        module.weight.copy_(1 + 0.2 * torch.randn(n))
        module.bias.copy_(0.2 * torch.randn(n))
        module.running_mean.copy_(0.2 * torch.randn(n))
        module.running_var.copy_(0.5 + torch.rand(n))
        module.num_batches_tracked.fill_(7)
  return model.eval()


def calc_pdist(feat1, feat2, vshift=10):
  win_size = vshift * 2 + 1
  feat2p = torch.nn.functional.pad(feat2, (0, 0, vshift, vshift))
  dists = []
  for i in range(0, len(feat1)):
    dists.append(torch.nn.functional.pairwise_distance(feat1[[i], :].repeat(win_size, 1),
                                                       feat2p[i:i + win_size, :]))
  return dists


def offset_and_confidence(im_feat, cc_feat, vshift=15):
  """evaluate's "Compute offset" block: (offset, conf, minval, dists_npy)."""
  dists = calc_pdist(im_feat, cc_feat, vshift=vshift)
  mdist = torch.mean(torch.stack(dists, 1), 1)
  minval, minidx = torch.min(mdist, 0)
  offset = vshift - minidx
  conf = torch.median(mdist) - minval
  dists_npy = np.array([dist.numpy() for dist in dists])
  return int(offset), float(conf), float(minval), dists_npy


def evaluate(model, images, audio, vshift=15, batch_size=20):
  """evaluate from its loaded inputs: `images` as cv2 reads them (T, H, W, 3) BGR uint8, `audio`
  the int16 samples; the MFCCs by python_speech_features as upstream."""
  import python_speech_features  # noqa: PLC0415 (the test reference only)

  im = np.stack(images, axis=3)
  im = np.expand_dims(im, axis=0)
  im = np.transpose(im, (0, 3, 4, 1, 2))
  imtv = torch.from_numpy(im.astype(float)).float()
  mfcc = zip(*python_speech_features.mfcc(audio, 16000))
  mfcc = np.stack([np.array(i) for i in mfcc])
  cc = np.expand_dims(np.expand_dims(mfcc, axis=0), axis=0)
  cct = torch.from_numpy(cc.astype(float)).float()
  min_length = min(len(images), math.floor(len(audio) / 640))
  lastframe = min_length - 5
  im_feat = []
  cc_feat = []
  with torch.no_grad():
    for i in range(0, lastframe, batch_size):
      im_batch = [imtv[:, :, vframe:vframe + 5, :, :]
                  for vframe in range(i, min(lastframe, i + batch_size))]
      im_in = torch.cat(im_batch, 0)
      im_feat.append(model.forward_lip(im_in))
      cc_batch = [cct[:, :, :, vframe * 4:vframe * 4 + 20]
                  for vframe in range(i, min(lastframe, i + batch_size))]
      cc_in = torch.cat(cc_batch, 0)
      cc_feat.append(model.forward_aud(cc_in))
  im_feat = torch.cat(im_feat, 0)
  cc_feat = torch.cat(cc_feat, 0)
  return offset_and_confidence(im_feat, cc_feat, vshift), im_feat.numpy(), cc_feat.numpy()


def crop_video_frames(frames, bboxes, crop_scale=0.40):
  """crop_video's arithmetic on a track's (x0, y0, x1, y1) boxes, the frames in memory instead
  of JPEG files and the crops returned instead of written."""
  import cv2  # noqa: PLC0415 (only here, as mediapipe's dependency: the test skips without it)

  dets = {"x": [], "y": [], "s": []}
  for det in bboxes:
    dets["s"].append(max((det[3] - det[1]), (det[2] - det[0])) / 2)
    dets["y"].append((det[1] + det[3]) / 2)
    dets["x"].append((det[0] + det[2]) / 2)
  dets["s"] = signal.medfilt(dets["s"], kernel_size=13)
  dets["x"] = signal.medfilt(dets["x"], kernel_size=13)
  dets["y"] = signal.medfilt(dets["y"], kernel_size=13)
  crops = []
  for fidx, image in enumerate(frames):
    cs = crop_scale
    bs = dets["s"][fidx]
    bsi = int(bs * (1 + 2 * cs))
    frame = np.pad(image, ((bsi, bsi), (bsi, bsi), (0, 0)), "constant",
                   constant_values=(110, 110))
    my = dets["y"][fidx] + bsi
    mx = dets["x"][fidx] + bsi
    face = frame[int(my - bs):int(my + bs * (1 + 2 * cs)),
                 int(mx - bs * (1 + cs)):int(mx + bs * (1 + cs))]
    crops.append(cv2.resize(face, (224, 224)))
  return np.stack(crops), dets
