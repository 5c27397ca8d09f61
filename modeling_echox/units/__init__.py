"""Speech units: the k-means over an audio tower's frames, the unit extractor, and the unit language over them."""
