"""The model hub: our GGUF -> Hugging Face converter and the on-disk model store.

Kept import-free on purpose: `mxext --help` and `ModelStore.resolve` of a ready folder should not pay
for importing torch. Import `app.hub.gguf_convert` / `app.hub.store` directly.
"""

# Bump when the converter's output changes in a way that should make the store reconvert its cached
# folders. Lives here so the store can compare it without importing torch.
CONVERTER_VERSION = 1
