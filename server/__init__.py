"""edgeft.server: the gRPC coordinator (not built yet; see protos/README.md)."""
