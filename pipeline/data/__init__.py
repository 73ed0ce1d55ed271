"""The data stage: sharding, manifests, the embedded demo dataset, training and evaluation streams."""
