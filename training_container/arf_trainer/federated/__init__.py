"""Federated training with Flower: `arf-trainer federate` (see DESIGN.md "Federated training").

`site.py`   one site's local training (torch only; no Flower): load its shards, train the
            received weights for local epochs, return weights + sample counts + losses.
`apps.py`   Flower's ServerApp (strategy over the sites, deterministic aggregation) and
            ClientApp (runs `site.py` inside a SuperNode on that site's data only).
`manifests.py` each site's manifest metadata (from the job spec, else the site's file): the
            model's shape, the sites' agreement on columns, the lineage. No Flower imports.
`launch.py` the step: one SuperLink and one SuperNode per site on loopback, `flwr run`, then
            the global model in the layout of the train step, tracked in MLflow.

Flower (flwr 1.42) needs protobuf < 7, the Airflow venv has protobuf 7: these modules run in
the federation venv (`make federation-venv`, the image's federated target), never in Airflow.
"""
