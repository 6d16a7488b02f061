from gvae_jax.samples import SAMPLE_PHOTO, QUICKSTART_IMAGES, write_samples

write_samples()
print(f"wrote {SAMPLE_PHOTO} and {QUICKSTART_IMAGES}/")
