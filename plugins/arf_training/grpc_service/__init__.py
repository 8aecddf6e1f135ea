"""The gRPC `arf.cloud.v1.TrainingService`: a thin adapter over `arf_training.client`.

`server.py` maps each RPC onto `TrainingClient` and client errors onto gRPC status codes;
`gen/` holds the code generated from `protos/arf/cloud/v1/training.proto` (`codegen.py`
regenerates it). grpcio is imported only here, never by DAG parsing.
"""
