"""The benchmark suite (`vlmkit bench`, `make bench`): vlmkit beside a plain-PyTorch peer."""
