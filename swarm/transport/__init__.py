"""The only swarm package that imports grpc or swarm.proto: framing, tensors, errors."""
