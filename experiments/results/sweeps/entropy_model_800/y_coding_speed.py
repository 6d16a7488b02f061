"""Times one coder.encode/decode of the y symbols of kodim01 at s = 2, per installed coder:
python y_coding_speed.py MODEL_DIR [MODEL_DIR ...] (Kodak at /work/shared/data/kodak)."""
import sys, time, numpy as np
from gvae_jax.coding import export, codec, coder as coder_lib
from gvae_jax.eval import images as ev
(name, px), = ev.load_images("/work/shared/data/kodak", 1)
for d in sys.argv[1:]:
  m = export.load_model(d)
  enc = codec.encode(m, px, 2.0)
  print(d.split("/")[-2], "distinct rows", len(np.unique(enc.y_indexes)))
  for cid in coder_lib.coder_ids():
    c = coder_lib.get_coder(cid)
    c.encode(enc.y_symbols, enc.y_indexes, m.y_table)  # warm (table models/lookups)
    t = time.perf_counter(); data = c.encode(enc.y_symbols, enc.y_indexes, m.y_table); te = time.perf_counter() - t
    t = time.perf_counter(); out = c.decode(data, enc.y_indexes, m.y_table); td = time.perf_counter() - t
    assert np.array_equal(out, enc.y_symbols)
    print(f"  coder {c.name}: y encode {te*1e3:.1f} ms, decode {td*1e3:.1f} ms, {len(data)} bytes")
