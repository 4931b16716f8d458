"""Feature analysis: per-latent statistics of an SAE on its evaluation corpus (``stats``), the
stage that writes them (``analyze``), the feature database (``store``) and a static dashboard
(``dashboard``)."""
