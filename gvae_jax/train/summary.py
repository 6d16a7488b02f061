"""TensorBoard event files (tensorboardX, no TensorFlow) and a terminal progress bar."""
from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm


class SummaryLogger:
  def __init__(self, workdir: Path, *, enabled: bool = True, progress: bool = True,
               total: int = 0, initial: int = 0):
    self.enabled = enabled
    self._writer = None
    self._bar = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    self._writer = SummaryWriter(str(Path(workdir) / "tensorboard"))
    if progress:
      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    self._position = initial

  def write(self, step: int, scalars: dict[str, float], prefix: str) -> None:
    if not self.enabled:
      return
    for key, value in scalars.items():
      if value is None:
        continue
      self._writer.add_scalar(f"{prefix}/{key}", value, step)
    self._writer.flush()
    if self._bar is not None and prefix == "train":
      self._bar.set_postfix(loss=f"{scalars['loss']:.3f}", bpp=f"{scalars['bpp']:.3f}",
                            psnr=f"{scalars['psnr']:.2f}")
    elif self._bar is None and prefix == "train":
      print(f"step {step}: loss {scalars['loss']:.4f} bpp {scalars['bpp']:.4f} "
            f"psnr {scalars['psnr']:.2f} ({scalars.get('steps_per_second', 0):.2f} steps/s)",
            flush=True)

  def advance(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._position)
      self._position = step

  def print_table(self, text: str) -> None:
    if self.enabled:
      (self._bar.write if self._bar is not None else print)(text)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._writer is not None:
      self._writer.close()
