"""Generic dynamic batcher for non-LLM models (classifiers, embedders, vision) served over KServe v2.

A model repository (`repository.py`) declares each model; `service.py` loads it through a backend
(`backends/`), puts a `DynamicBatcher` in front of it and `kserve.py` exposes it over HTTP."""
