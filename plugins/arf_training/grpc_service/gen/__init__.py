"""Generated from protos/arf/cloud/v1/training.proto by codegen.py; do not edit."""
