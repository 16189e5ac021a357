"""Images in, samples out: decoding, listing, splits, caches, samplers, augmentation, audit. Not model/."""
