"""Pieces of the test-split evaluation that `vaeflow.evaluate` streams batches through:
rFID (`fid`), LPIPS (`perceptual`) and the PCA baseline (`pca`). Each either reports a
number with the protocol that produced it, or `{"available": false, "reason": ...}`."""
