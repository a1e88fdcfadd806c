"""The decision engine: encode -> detect -> steer -> decide -> record, one batch at a time.

It reaches plugins only through :class:`guard.engine.plugins.PluginSet`; it knows nothing of
gRPC."""
