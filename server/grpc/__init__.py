"""gRPC transport: servicers, converters, status mapping, reflection."""
