"""edgeft.client: the device agent (not built yet; see protos/README.md). Never imports torch."""
