"""Escaped y symbols, scale statistics and real-vs-estimate overheads of a model
(first two images of a folder, s = 2): python diagnose_escapes.py MODEL_DIR [IMAGES]"""
import sys, numpy as np, jax, jax.numpy as jnp
from gvae_jax.coding import codec, export
from gvae_jax.eval import report
from gvae_jax.eval import images as ev
m = export.load_model(sys.argv[1])
imgs = ev.load_images(sys.argv[2] if len(sys.argv) > 2 else "../shared/data/kodak", 2)
for name, px in imgs:
  row = report.measure(m, px, 2.0)
  print(name, {k: round(v, 3) for k, v in row.items() if "pct" in k})
  enc = codec.encode(m, px, 2.0)
  s = jnp.full((1,), np.float32(2.0))
  sc = report._scales(m.lossy_model, m.lossy_params, jnp.asarray(enc.z_symbols), s)
  sc = sc if isinstance(sc, tuple) else (sc,)
  for a in sc:
    a = np.asarray(a); print("  scale>256 frac", float(np.mean(a > 256)), "max", float(a.max()), "median", float(np.median(a)))
  tab = m.y_table
  vals = enc.y_symbols.ravel() - tab.offsets[enc.y_indexes.ravel()]
  print("  escapes", int(np.sum((vals < 0) | (vals >= tab.lengths[enc.y_indexes.ravel()]))), "of", vals.size)
