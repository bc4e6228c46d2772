"""Energy meters read around a timed window: NVML on NVIDIA GPUs, RAPL on CPUs, or none.

Each meter reads a cumulative hardware counter, so the energy of a window is the difference of
two readings; nothing is estimated. `meter(devices)` picks the meter for the devices a row
runs on, or a `NoMeter` that says why there is none.

  NVML   nvmlDeviceGetTotalEnergyConsumption (millijoules since the driver loaded), summed
         over the GPUs in use. The counter moves about every 100 ms: windows of seconds.
  RAPL   /sys/class/powercap/intel-rapl:N/energy_uj of every CPU package (microjoules; wraps
         at max_energy_range_uj). Covers the whole package, so other processes count too.
"""

from __future__ import annotations

import glob
import importlib.util
import os

POWERCAP = '/sys/class/powercap'


class NoMeter:
  method = 'none'

  def __init__(self, reason: str):
    self.reason = reason

  def read(self) -> None:
    return None

  def joules(self, start, end) -> None:
    return None


class NvmlMeter:
  """Total energy of the given NVIDIA GPUs (indices as NVML numbers them)."""
  method = 'nvml'
  reason = None

  def __init__(self, indices: list[int]):
    import pynvml
    pynvml.nvmlInit()
    self._nvml = pynvml
    self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]

  def read(self) -> list[int]:
    return [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]

  def joules(self, start, end) -> float:
    return sum(b - a for a, b in zip(start, end)) / 1e3


class RaplMeter:
  """Energy of the CPU packages from the powercap sysfs counters."""
  method = 'rapl'
  reason = None

  def __init__(self, domains: list[str]):
    self._domains = domains
    self._ranges = [int(_read(os.path.join(d, 'max_energy_range_uj'))) for d in domains]

  def read(self) -> list[int]:
    return [int(_read(os.path.join(d, 'energy_uj'))) for d in self._domains]

  def joules(self, start, end) -> float:
    # A counter that wrapped during the window went once around its range.
    return sum((b - a) % r for a, b, r in zip(start, end, self._ranges)) / 1e6


def _read(path: str) -> str:
  with open(path) as f:
    return f.read().strip()


def rapl_domains(root: str = POWERCAP) -> list[str]:
  """The package-level RAPL domains (intel-rapl:N, not their sub-domains), if readable."""
  out = []
  for d in sorted(glob.glob(os.path.join(root, 'intel-rapl:*'))):
    if os.path.basename(d).count(':') != 1:
      continue  # intel-rapl:N:M is a part (cores, dram) of package N.
    try:
      _read(os.path.join(d, 'energy_uj'))
      _read(os.path.join(d, 'max_energy_range_uj'))
    except OSError:
      continue
    out.append(d)
  return out


def meter(devices, powercap_root: str = POWERCAP):
  """The meter for `devices` (all of one platform)."""
  platform = devices[0].platform
  if platform == 'gpu':
    if importlib.util.find_spec('pynvml') is None:
      return NoMeter('nvidia-ml-py is not installed (pip install nvidia-ml-py)')
    try:
      return NvmlMeter([d.local_hardware_id if d.local_hardware_id is not None else d.id
                        for d in devices])
    except Exception as e:  # NVML errors: no driver access, a GPU without the counter.
      return NoMeter(f'NVML: {e}')
  if platform == 'cpu':
    if not os.path.isdir(powercap_root):
      return NoMeter(f'no RAPL: {powercap_root} does not exist (not an Intel/AMD host, or '
                     'a container without it)')
    domains = rapl_domains(powercap_root)
    if not domains:
      return NoMeter(f'no RAPL: no readable intel-rapl package domain in {powercap_root} '
                     '(energy_uj needs root on most kernels)')
    return RaplMeter(domains)
  return NoMeter(f'no energy counter known for {platform} devices')
