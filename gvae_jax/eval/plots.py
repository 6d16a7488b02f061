"""Rate-distortion plots of a `gvae eval` run (matplotlib Agg canvas, no pyplot state).

    render_all(results) -> {"psnr_bpp.png": png bytes, "msssim_bpp.png": ...,
                            "bpsp_tau.png": ...}

* psnr_bpp.png: mean PSNR against mean bpp, the model and every lossy anchor.
* msssim_bpp.png: mean MS-SSIM in dB (-10 log10(1 - MS-SSIM)) against bpp.
* bpsp_tau.png: the model's bpsp against tau, JPEG-LS NEAR=tau, and the
  lossless anchors at tau 0.

A plot without data (no lossy rates, images too small for MS-SSIM, no taus)
still gets written, with a note saying why it is empty, so a run always
produces the same files.
"""
from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gvae_jax.eval.anchors import LOSSLESS, LOSSY, NEAR_LOSSLESS
from gvae_jax.eval.means import MODEL_CODEC, lossy_curve
from gvae_jax.eval.quality import ms_ssim_db

MODEL_STYLE = {"color": "black", "marker": "o", "linewidth": 2.0, "markersize": 4, "zorder": 3}


def _figure(title: str, xlabel: str, ylabel: str):
  fig = Figure(figsize=(7, 5), dpi=110)
  FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
  ax = fig.add_subplot()
  ax.set_title(title, fontsize=11)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  return fig, ax


def _png(fig) -> bytes:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", bbox_inches="tight")
  return buffer.getvalue()


def _empty(ax, note: str) -> None:
  ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, wrap=True)


def _model_label(results: dict) -> str:
  label = f"{MODEL_CODEC} ({results['model']['name']})"
  if results.get("overrides"):
    label += " " + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in results["overrides"].items())
  return label


def rd_plot(results: dict, metric: str) -> bytes:
  """PSNR (metric "psnr") or MS-SSIM dB (metric "ms_ssim") against bpp."""
  means = results["means"]
  if metric == "psnr":
    quality, ylabel = (lambda m: m.get("psnr")), "PSNR (dB, RGB)"
  else:
    quality, ylabel = (lambda m: ms_ssim_db(m.get("ms_ssim"))), "MS-SSIM (dB)"
  count = len(results["images"]["evaluated"])
  fig, ax = _figure(f"{'PSNR' if metric == 'psnr' else 'MS-SSIM'} vs rate, mean of {count} "
                    "images (real files)", "bits per pixel", ylabel)
  codecs = [MODEL_CODEC] + sorted({m["codec"] for m in means if m["mode"] ==
                                           LOSSY and m["codec"] != MODEL_CODEC})
  plotted = False
  for name in codecs:
    curve = [(m["bpp"], quality(m)) for m in lossy_curve(means, name)]
    curve = [(x, y) for x, y in curve if y is not None and y != float("inf")]
    if not curve:
      continue
    xs, ys = zip(*curve)
    if name == MODEL_CODEC:
      ax.plot(xs, ys, label=_model_label(results), **MODEL_STYLE)
    else:
      ax.plot(xs, ys, marker=".", linewidth=1.2, label=name)
    plotted = True
  if plotted:
    ax.legend(fontsize=8)
  elif metric == "ms_ssim":
    _empty(ax, "no MS-SSIM values: it needs images of at least 161 pixels a side")
  else:
    _empty(ax, "no lossy results in this run")
  return _png(fig)


def tau_plot(results: dict) -> bytes:
  """bpsp against tau: the model, JPEG-LS NEAR and the lossless anchors at tau 0."""
  means = results["means"]
  fig, ax = _figure("Near-lossless and lossless: bits per subpixel vs tau (real files)",
                    "tau (largest error per sample)", "bits per subpixel")
  plotted = False
  model = sorted(((m["setting"], m["bpsp"]) for m in means if m["codec"] == MODEL_CODEC
                  and m["mode"] != LOSSY and m.get("bpsp") is not None))
  if model:
    xs, ys = zip(*model)
    ax.plot(xs, ys, label=_model_label(results), **MODEL_STYLE)
    plotted = True
  near = {}
  for m in means:
    if m["mode"] == NEAR_LOSSLESS and m["codec"] != MODEL_CODEC and m.get("bpsp"):
      near.setdefault(m["codec"], []).append((m["tau"], m["bpsp"]))
  for name, points in sorted(near.items()):
    xs, ys = zip(*sorted(points))
    ax.plot(xs, ys, marker="s", linewidth=1.2, label=f"{name} (NEAR=tau)")
    plotted = True
  lossless = [m for m in means if m["mode"] == LOSSLESS and m["codec"] !=
              MODEL_CODEC and m.get("bpsp") is not None]
  for m in sorted(lossless, key=lambda m: m["bpsp"]):
    ax.plot([0], [m["bpsp"]], marker="x", linestyle="none", markersize=8,
            label=f"{m['codec']} (lossless)")
    plotted = True
  if plotted:
    ax.set_xticks(sorted({int(t) for t in [*(p[0] for p in model),
                                            *(p[0] for v in near.values() for p in v), 0]}))
    ax.legend(fontsize=8)
  else:
    _empty(ax, "no near-lossless or lossless results in this run")
  return _png(fig)


def sweep_plots(summary: dict) -> dict[str, bytes]:
  """A collated sweep (gvae_jax.sweep.collate): one curve per run group.

  sweep_psnr_bpp.png when the sweep has lossy rows, sweep_bpsp_tau.png when
  it has near-lossless or lossless ones.
  """
  figures = {}
  lossy, residual = {}, {}
  for row in summary["rows"]:
    if row.get("mode") == LOSSY and row.get("psnr") is not None:
      lossy.setdefault(row["group"], []).append((row["bpp"], row["psnr"]))
    elif row.get("mode") != LOSSY and row.get("bpsp") is not None:
      residual.setdefault(row["run"], []).append((row["tau"], row["bpsp"]))
  for name, curves, labels in (
      ("sweep_psnr_bpp.png", lossy, ("bits per pixel", "PSNR (dB, RGB)")),
      ("sweep_bpsp_tau.png", residual, ("tau (largest error per sample)", "bits per subpixel"))):
    if not curves:
      continue
    fig, ax = _figure(f"Sweep {summary['sweep']} (real files)", *labels)
    for label, points in curves.items():
      xs, ys = zip(*sorted(points))
      # The reference is drawn thicker; matplotlib picks the colours.
      width = 2.5 if label == summary.get("reference") else 1.2
      ax.plot(xs, ys, marker="o", markersize=4, linewidth=width, label=label)
    ax.legend(fontsize=8)
    figures[name] = _png(fig)
  return figures


def render_all(results: dict) -> dict[str, bytes]:
  return {"psnr_bpp.png": rd_plot(results, "psnr"),
          "msssim_bpp.png": rd_plot(results, "ms_ssim"),
          "bpsp_tau.png": tau_plot(results)}
