"""Green-list output watermark (Kirchenbauer et al., 2023, "A Watermark for Large Language Models"): a keyed hash
of the previous token splits the vocabulary into a green share `gamma` and the rest; generation adds `delta` to
the green logits; the detector counts green tokens and reports a z-score. Off unless a key is given.

`config` is torch-free (the server process reads it); `greenlist` holds the hash, the logits processor and the
detector."""
