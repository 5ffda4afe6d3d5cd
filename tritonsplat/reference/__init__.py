"""The torch backend: one pure-PyTorch module per stage, twins of `tritonsplat.ops`."""
