"""Images in, samples out: decoding (images), dataset roots and downloads (sources), folder listing, splits
and the Dataset (folder), decoded-image cache (image_cache), samplers (sampler), albumentations pipelines
(augment) and the dataset audit (audit). Independent of model/."""
