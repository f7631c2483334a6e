"""OsteoFL: federated opportunistic osteoporosis screening on CT.

The design card's folders install beneath this namespace: ``osteofl.server`` (server/),
``osteofl.client`` (client/), ``osteofl.simulation`` (simulation/) and ``osteofl.configs`` (configs/).
The science lives in the separate ``osteo_model`` package, which never imports Flower.
"""
