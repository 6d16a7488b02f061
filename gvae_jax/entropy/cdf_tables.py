"""Integer CDF tables for entropy coding, built once from float pmfs.

A table has one row per distribution (e.g. per Gaussian scale, or per channel
of the factorized prior). Row r codes the integer symbols
offsets[r] + 0 ... offsets[r] + lengths[r] - 1 with its own probabilities, plus
one escape symbol (index lengths[r]) whose probability is the tail mass: every
value outside the row's range is coded as the escape and stored losslessly by
the coder (see gvae_jax.coding.coder).

Layout of `CdfTable.cdf` (int32, [rows, max_len + 2]), for a row of length L:

  cdf[r, k]     = total count of symbols < k, for k = 0 ... L + 1
  cdf[r, 0]     = 0
  cdf[r, L + 1] = 2**precision          (the escape ends the row)
  cdf[r, k > L + 1] = 2**precision      (padding)

Every symbol, the escape included, has count >= 1, so the row is strictly
increasing up to 2**precision and any value stays codable.

Choosing the range: every in-range symbol costs at least one count, so a row
should end where symbol probabilities fall to about 2**-precision (for a
Gaussian, tail masses of 2**-8 ... 1e-4, as TFC uses). Longer rows waste
counts on symbols the escape codes more cheaply: at scale 256 with tail mass
1e-9 the quantized cross-entropy is 0.29% above ideal, with 2**-8 it is 0.001%.

Determinism: the exported model stores these integers and decoding never
rebuilds them from floats. Building them is deterministic too: the only float
operation is w = rint(p * 2**46) per probability. Scaling by a power of two is
exact, so w is p correctly rounded to a multiple of 2**-46 on any IEEE-754
machine. Everything after, including the default tail mass
2**46 - sum(w), is integer arithmetic.
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Mapping

import numpy as np

MAX_PRECISION = 16  # the range coder keeps 32-bit state and needs 16 bits of headroom
_WEIGHT_BITS = 46  # probability 1 in fixed point; sums of rows stay far below 2**63
_KEY_SHIFT = 64  # fixed-point resolution of the integer allocation keys


def _allocate_counts(w: list[int], total: int) -> list[int]:
  """Integer counts >= 1 summing to `total`, close to proportional to w.

  Maximizes sum_i w_i * F(c_i) with F(c + 1) - F(c) = 1 / (c + 1/2), a smooth
  stand-in for log(c) (the cross-entropy), using only integer keys:
  start at the floors of the proportional shares (at least 1), fix the sum
  greedily, then move single counts while that improves the objective. The
  objective is separable and concave, so no improving single move left means
  optimal. Ties go to the lower symbol index, so the result is reproducible.
  """
  n = len(w)
  w_sum = sum(w)
  counts = [max(1, (wi * total) // w_sum) for wi in w]

  def gain(i: int) -> int:  # value of giving symbol i one more count
    return (w[i] << _KEY_SHIFT) // (2 * counts[i] + 1)

  def loss(i: int) -> int:  # value lost by taking one count from symbol i
    return (w[i] << _KEY_SHIFT) // (2 * counts[i] - 1)

  excess = sum(counts) - total
  if excess < 0:
    heap = [(-gain(i), i) for i in range(n)]
    heapq.heapify(heap)
    for _ in range(-excess):
      _, i = heapq.heappop(heap)
      counts[i] += 1
      heapq.heappush(heap, (-gain(i), i))
  elif excess > 0:
    heap = [(loss(i), i) for i in range(n) if counts[i] > 1]
    heapq.heapify(heap)
    for _ in range(excess):
      _, i = heapq.heappop(heap)
      counts[i] -= 1
      if counts[i] > 1:
        heapq.heappush(heap, (loss(i), i))

  # Exchange pass. Heaps hold (key, i, count at push time); stale entries are
  # skipped. Each move strictly raises the objective, so the loop ends.
  gains = [(-gain(i), i, counts[i]) for i in range(n)]
  losses = [(loss(i), i, counts[i]) for i in range(n) if counts[i] > 1]
  heapq.heapify(gains)
  heapq.heapify(losses)
  while gains and losses:
    neg_g, i, ci = gains[0]
    if ci != counts[i]:
      heapq.heappop(gains)
      continue
    l, j, cj = losses[0]
    if cj != counts[j] or counts[j] <= 1:
      heapq.heappop(losses)
      continue
    if i == j or -neg_g <= l:
      break  # best gain does not beat the cheapest loss: optimal
    counts[i] += 1
    counts[j] -= 1
    heapq.heappush(gains, (-gain(i), i, counts[i]))
    heapq.heappush(gains, (-gain(j), j, counts[j]))
    heapq.heappush(losses, (loss(i), i, counts[i]))
    if counts[j] > 1:
      heapq.heappush(losses, (loss(j), j, counts[j]))
  return counts


def quantize_pmf_to_cdf(pmf: np.ndarray, lengths: np.ndarray, precision: int = 16,
                        tail_mass: np.ndarray | None = None) -> np.ndarray:
  """Integer CDF table (int32 [rows, max_len + 2], layout in the module doc).

  pmf: float [rows, max_len]; row r uses pmf[r, :lengths[r]] (the rest is
    ignored). Probabilities need not sum to exactly 1.
  lengths: int [rows], 1 <= lengths[r] <= max_len.
  precision: counts sum to exactly 2**precision (1 ... 16).
  tail_mass: float [rows], the escape symbol's probability; by default
    max(0, 1 - sum of the row's pmf), computed exactly on the fixed-point
    probabilities. A zero tail still gets count 1.
  Probabilities must lie in [0, 1].
  """
  pmf = np.asarray(pmf, np.float64)
  if pmf.ndim != 2 or pmf.shape[0] == 0 or pmf.shape[1] == 0:
    raise ValueError(f"pmf must be a non-empty [rows, max_len] array, got shape {pmf.shape}")
  rows, max_len = pmf.shape
  lengths = np.asarray(lengths)
  if lengths.shape != (rows,) or not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f"lengths must be integers of shape ({rows},), "
                     f"got {lengths.dtype} {lengths.shape}")
  lengths = lengths.astype(np.int64)
  if not 1 <= int(precision) <= MAX_PRECISION:
    raise ValueError(f"precision must be in [1, {MAX_PRECISION}], got {precision}")
  precision = int(precision)
  total = 1 << precision
  if lengths.min() < 1 or lengths.max() > max_len:
    raise ValueError(f"lengths must be in [1, {max_len}]")
  if lengths.max() + 1 > total:
    raise ValueError(f"{lengths.max()} symbols plus the escape do not fit "
                     f"in 2**{precision} counts")

  in_range = np.arange(max_len)[None, :] < lengths[:, None]
  probs = np.where(in_range, pmf, 0.0)
  if not np.all((probs >= 0) & (probs <= 1)):  # also rejects NaN
    raise ValueError("pmf entries must be probabilities in [0, 1]")

  # The one float -> int step (exact scaling, then rounding); the escape sits
  # right after each row's last symbol.
  one = 1 << _WEIGHT_BITS
  weights = np.zeros((rows, max_len + 1), np.int64)
  weights[:, :max_len] = np.rint(probs * one).astype(np.int64)
  if tail_mass is None:
    tail = np.maximum(0, one - weights.sum(axis=1))
  else:
    tail = np.asarray(tail_mass, np.float64)
    if tail.shape != (rows,) or not np.all((tail >= 0) & (tail <= 1)):
      raise ValueError(f"tail_mass must be probabilities in [0, 1], shape ({rows},)")
    tail = np.rint(tail * one).astype(np.int64)
  weights[np.arange(rows), lengths] = tail
  if np.any(weights.sum(axis=1) == 0):
    raise ValueError("every row needs some probability mass (above 2**-46)")

  cdf = np.full((rows, max_len + 2), total, np.int32)
  for r in range(rows):
    n = int(lengths[r]) + 1
    counts = _allocate_counts([int(v) for v in weights[r, :n]], total)
    cdf[r, 0] = 0
    cdf[r, 1:n + 1] = np.cumsum(counts)
  return cdf


@dataclasses.dataclass(frozen=True, eq=False)
class CdfTable:
  """Integer CDFs plus the symbol range of each row; what the coders consume.

  cdf: int32 [rows, width], width >= max(lengths) + 2 (layout in module doc).
  lengths: int32 [rows], in-range symbols per row (the escape not counted).
  offsets: int32 [rows], the integer symbol that index 0 of the row stands for.
  precision: the counts of every row sum to 2**precision.
  """
  cdf: np.ndarray
  lengths: np.ndarray
  offsets: np.ndarray
  precision: int

  def __post_init__(self):
    # Normalize dtypes once (the class is frozen), then validate: a table
    # loaded from a damaged file must fail here, not inside a coder.
    for name in ("cdf", "lengths", "offsets"):
      value = np.asarray(getattr(self, name))
      if not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"CdfTable.{name} must be integers, got {value.dtype}")
      info = np.iinfo(np.int32)
      if value.size and (value.min() < info.min or value.max() > info.max):
        raise ValueError(f"CdfTable.{name} does not fit int32")
      object.__setattr__(self, name, np.ascontiguousarray(value, np.int32))
    object.__setattr__(self, "precision", int(self.precision))
    self._validate()

  def _validate(self):
    cdf, lengths, offsets = self.cdf, self.lengths, self.offsets
    if not 1 <= self.precision <= MAX_PRECISION:
      raise ValueError(f"precision must be in [1, {MAX_PRECISION}], got {self.precision}")
    if cdf.ndim != 2 or cdf.shape[0] == 0:
      raise ValueError(f"cdf must be [rows, width] with rows >= 1, got {cdf.shape}")
    rows, width = cdf.shape
    if lengths.shape != (rows,) or offsets.shape != (rows,):
      raise ValueError(f"lengths and offsets must have shape ({rows},)")
    if lengths.min() < 1 or lengths.max() + 2 > width:
      raise ValueError(f"lengths must be in [1, {width - 2}] for a cdf of width {width}")
    if np.any(offsets.astype(np.int64) + lengths > np.iinfo(np.int32).max):
      raise ValueError("offsets + lengths overflow int32")
    total = 1 << self.precision
    k = np.arange(width)[None, :]
    end = (lengths + 1)[:, None]  # column of the final 2**precision
    steps = np.diff(cdf, axis=1)
    if np.any(cdf[:, 0] != 0):
      raise ValueError("every cdf row must start at 0")
    if np.any(steps[k[:, :-1] < end] < 1):
      raise ValueError("every symbol (escape included) needs a count >= 1")
    if np.any(cdf[k >= end] != total):
      raise ValueError(f"every cdf row must end at 2**precision = {total}, padded with it")

  @property
  def num_rows(self) -> int:
    return self.cdf.shape[0]

  @classmethod
  def from_pmf(cls, pmf: np.ndarray, lengths: np.ndarray, offsets: np.ndarray,
               precision: int = 16, tail_mass: np.ndarray | None = None) -> "CdfTable":
    """Quantizes pmf rows (see `quantize_pmf_to_cdf`); offsets as in the class doc."""
    cdf = quantize_pmf_to_cdf(pmf, lengths, precision, tail_mass)
    return cls(cdf, np.asarray(lengths), np.asarray(offsets), precision)

  def bits(self, symbols: np.ndarray, indexes: np.ndarray) -> float:
    """-sum log2 q(symbol) under the integer table: the ideal code length.

    Out-of-range symbols count only the escape symbol, not the value the
    coder stores after it.
    """
    indexes = np.asarray(indexes, np.int64).ravel()
    values = np.asarray(symbols, np.int64).ravel() - self.offsets[indexes]
    lengths = self.lengths[indexes]
    values = np.where((values >= 0) & (values < lengths), values, lengths)
    counts = self.cdf[indexes, values + 1].astype(np.int64) - self.cdf[indexes, values]
    return float(np.sum(self.precision - np.log2(counts)))

  def to_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
    """Numpy arrays for np.savez; `prefix` keeps several tables in one file."""
    return {f"{prefix}cdf": self.cdf, f"{prefix}lengths": self.lengths,
            f"{prefix}offsets": self.offsets,
            f"{prefix}precision": np.asarray(self.precision, np.int32)}

  @classmethod
  def from_dict(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> "CdfTable":
    """Inverse of `to_dict`; accepts the mapping np.load returns for an .npz."""
    keys = ("cdf", "lengths", "offsets", "precision")
    missing = [prefix + key for key in keys if prefix + key not in arrays]
    if missing:
      raise ValueError(f"CDF table arrays missing: {', '.join(missing)}")
    precision = np.asarray(arrays[prefix + "precision"])
    if precision.shape != () or not np.issubdtype(precision.dtype, np.integer):
      raise ValueError("CDF table precision must be an integer scalar")
    return cls(np.asarray(arrays[prefix + "cdf"]), np.asarray(arrays[prefix + "lengths"]),
               np.asarray(arrays[prefix + "offsets"]), int(precision))
