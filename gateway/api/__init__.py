"""The gRPC adapters: servicers, interceptors, status mapping and the server.

The only code that speaks gRPC besides the generated `gateway._proto`; it
translates requests into calls on `gateway.runtime` and results back.
"""
