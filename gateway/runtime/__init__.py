"""The running gateway the gRPC adapters call: config, policies, auth, the check
pipeline, logs and stats. It never imports gRPC or the generated code."""
