"""Hospital side of the federation: ClientApp, site state store, `osteo-client`."""
