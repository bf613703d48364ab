"""keyrelay's shared core: the wire contract, signatures, settings machinery, NATS connect and HTTP serving.

The publisher, the sidecar and the `keyrelay` command build on it; it imports none of them.
"""
