"""Conversions between the EAS wire formats (protobuf ArrayProto) and numpy arrays."""
