"""The numeric core: tensors in, tensors out. Knows nothing about modules."""
