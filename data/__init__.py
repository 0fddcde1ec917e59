"""binaryduo.data: DALI input pipelines and dataset preparation (image tensors and labels only)."""
