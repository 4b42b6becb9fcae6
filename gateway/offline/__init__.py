"""Offline evaluation and calibration on labelled files: no server, no gRPC,
no data directory writes beyond an optional vector cache."""
